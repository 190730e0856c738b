// Run-time choice of the CPU vector unit, and the parameter checks every unit relies on.
// Built with baseline flags: nothing here may use an instruction the oldest supported CPU lacks.
#include <atomic>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include "cpu/cpu_attention.h"
#include "cpu/tiling.h"

namespace attnext::cpu {
namespace {

using FwdFn = Status (*)(const FwdParams&);
using BwdFn = Status (*)(const BwdParams&);
using PeakFn = double (*)(int64_t);

struct Unit {
  FwdFn forward;
  BwdFn backward;
  PeakFn fma_peak;
};

Unit unit_of(Isa isa) {
  switch (isa) {
#if defined(ATTNEXT_HAVE_AVX512BF16)
    case Isa::kAvx512Bf16: return {avx512bf16::forward, avx512bf16::backward, avx512bf16::fma_peak};
#endif
#if defined(ATTNEXT_HAVE_AVX512)
    case Isa::kAvx512: return {avx512::forward, avx512::backward, avx512::fma_peak};
#endif
#if defined(ATTNEXT_HAVE_AVX2)
    case Isa::kAvx2: return {avx2::forward, avx2::backward, avx2::fma_peak};
#endif
    default: return {scalar::forward, scalar::backward, scalar::fma_peak};
  }
}

bool cpu_has(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  if (isa == Isa::kScalar) return true;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
  const bool f16c = (c >> 29) & 1u;
  if (isa == Isa::kAvx2)
    return f16c && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  // Both AVX-512 units use AVX-512VL (ymm registers 16-31 for the 8-lane decode vectors).
  const bool avx512 = f16c && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("fma");
  if (isa == Isa::kAvx512) return avx512;
  // AVX512_BF16 is CPUID.(EAX=7, ECX=1):EAX bit 5 (the unit also uses AVX512BW's word shuffles);
  // __builtin_cpu_supports("avx512f") already means the OS saves the zmm state.
  if (isa == Isa::kAvx512Bf16)
    return avx512 && __builtin_cpu_supports("avx512bw") && __get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 5) & 1u);
  return false;
#else
  return isa == Isa::kScalar;
#endif
}

Isa initial_isa() {
  Isa isa = best_isa();
  if (const char* env = std::getenv("ATTNEXT_CPU_ISA")) {
    for (int i = 0; i < kNumIsas; ++i)
      if (std::strcmp(env, isa_name(static_cast<Isa>(i))) == 0 && isa_runnable(static_cast<Isa>(i)))
        isa = static_cast<Isa>(i);
  }
  return isa;
}

std::atomic<int32_t>& active() {
  static std::atomic<int32_t> isa{static_cast<int32_t>(initial_isa())};
  return isa;
}

Status check(const FwdParams& p) {
  if (p.batch < 0 || p.heads_q < 0 || p.heads_kv < 0 || p.seq_q < 0 || p.seq_k < 0) return Status::kBadShape;
  if (p.head_dim < 1 || p.head_dim > 512) return Status::kUnsupportedHeadDim;
  if (p.heads_kv == 0 ? p.heads_q != 0 : p.heads_q % p.heads_kv != 0) return Status::kBadShape;
  if (p.dtype != DType::kFloat32 && p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16)
    return Status::kUnsupportedDType;
  if (p.parallel_for == nullptr || p.num_threads < 1) return Status::kBadShape;
  return Status::kOk;
}

bool empty(const FwdParams& p) { return p.batch == 0 || p.heads_q == 0 || p.seq_q == 0; }

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx512Bf16: return "avx512bf16";
  }
  return "unknown";
}

bool isa_compiled(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return true;
#if defined(ATTNEXT_HAVE_AVX2)
    case Isa::kAvx2: return true;
#endif
#if defined(ATTNEXT_HAVE_AVX512)
    case Isa::kAvx512: return true;
#endif
#if defined(ATTNEXT_HAVE_AVX512BF16)
    case Isa::kAvx512Bf16: return true;
#endif
    default: return false;
  }
}

bool isa_runnable(Isa isa) { return isa_compiled(isa) && cpu_has(isa); }

Isa best_isa() {
  for (int i = kNumIsas - 1; i > 0; --i)
    if (isa_runnable(static_cast<Isa>(i))) return static_cast<Isa>(i);
  return Isa::kScalar;
}

Isa active_isa() { return static_cast<Isa>(active().load()); }

bool set_isa(Isa isa) {
  if (!isa_runnable(isa)) return false;
  active().store(static_cast<int32_t>(isa));
  return true;
}

Status forward(const FwdParams& p) {
  const Status s = check(p);
  if (s != Status::kOk || empty(p)) return s;
  return unit_of(active_isa()).forward(p);
}

Status backward(const BwdParams& p) {
  const Status s = check(p.fwd);
  if (s != Status::kOk) return s;
  if (empty(p.fwd) && p.fwd.seq_k == 0) return Status::kOk;
  return unit_of(active_isa()).backward(p);
}

int64_t backward_workspace_size(const FwdParams& p) { return backward_workspace_floats(p); }

double fma_peak_gflops(int64_t iters) { return unit_of(active_isa()).fma_peak(iters); }

}  // namespace attnext::cpu
