// The AVX2 + FMA + F16C unit: built with -mavx2 -mfma -mf16c on x86-64.
#include "cpu/vec_avx2.h"
#include "cpu/backward_impl.h"
#include "cpu/cpu_attention.h"
#include "cpu/forward_impl.h"
#include "cpu/peak.h"

namespace attnext::cpu::avx2 {

Status forward(const FwdParams& p) { return forward_impl<VecAvx2>(p); }
Status backward(const BwdParams& p) { return backward_impl<VecAvx2>(p); }
double fma_peak(int64_t iters) { return fma_peak_impl<VecAvx2>(iters); }

}  // namespace attnext::cpu::avx2
