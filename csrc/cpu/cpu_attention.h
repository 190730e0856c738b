// The CPU kernel layer's entry points: torch-free. The vector unit is chosen at run time from the
// units compiled in and the features of the CPU (or forced with set_isa / ATTNEXT_CPU_ISA).
#pragma once

#include <cstdint>

#include "attnext/params.h"

namespace attnext::cpu {

enum class Isa : int32_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };
constexpr int kNumIsas = 4;

const char* isa_name(Isa isa);
bool isa_compiled(Isa isa);  // built into this binary
bool isa_runnable(Isa isa);  // built in and supported by this CPU
Isa best_isa();
Isa active_isa();
// Selects the unit used from now on; false (and no change) when it is not runnable.
bool set_isa(Isa isa);

// Checks the parameters, then runs the active unit.
Status forward(const FwdParams& p);
Status backward(const BwdParams& p);
int64_t backward_workspace_size(const FwdParams& p);  // floats
// GFLOP/s of a pure FMA loop of the active unit on the calling thread (the per-core ceiling).
double fma_peak_gflops(int64_t iters);

// One entry pair per compiled unit.
namespace scalar { Status forward(const FwdParams&); Status backward(const BwdParams&); double fma_peak(int64_t); }
namespace avx2 { Status forward(const FwdParams&); Status backward(const BwdParams&); double fma_peak(int64_t); }
namespace avx512 { Status forward(const FwdParams&); Status backward(const BwdParams&); double fma_peak(int64_t); }
namespace avx512bf16 { Status forward(const FwdParams&); Status backward(const BwdParams&); double fma_peak(int64_t); }

}  // namespace attnext::cpu
