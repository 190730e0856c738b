// The AVX-512F unit: built with -mavx512f -mavx512vl -mfma -mf16c where the compiler supports it.
#include "cpu/vec_avx512.h"
#include "cpu/backward_impl.h"
#include "cpu/cpu_attention.h"
#include "cpu/forward_impl.h"
#include "cpu/peak.h"

namespace attnext::cpu::avx512 {

Status forward(const FwdParams& p) { return forward_impl<VecAvx512>(p); }
Status backward(const BwdParams& p) { return backward_impl<VecAvx512>(p); }
double fma_peak(int64_t iters) { return fma_peak_impl<VecAvx512>(iters); }

}  // namespace attnext::cpu::avx512
