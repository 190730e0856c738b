// The AVX512_BF16 unit: built with -mavx512f -mavx512vl -mavx512bf16 -mfma -mf16c where the compiler supports it.
// bf16 prefill forwards and bf16 backwards run on bf16 dot products (forward_bf16_pairs.h,
// backward_bf16_pairs.h); everything else (fp32 and fp16, decode shapes) is the AVX-512F unit's code,
// compiled here again.
#include "cpu/vec_avx512.h"
#include "cpu/backward_bf16_pairs.h"
#include "cpu/cpu_attention.h"
#include "cpu/forward_bf16_pairs.h"
#include "cpu/forward_impl.h"
#include "cpu/peak.h"

namespace attnext::cpu::avx512bf16 {

Status forward(const FwdParams& p) {
  if (p.dtype != DType::kBFloat16 || use_decode(p)) return forward_impl<VecAvx512>(p);
  forward_bf16_pairs(p);
  return Status::kOk;
}
Status backward(const BwdParams& p) {
  if (p.fwd.dtype != DType::kBFloat16) return backward_impl<VecAvx512>(p);
  return backward_run<PairBackward>(p);
}
double fma_peak(int64_t iters) { return fma_peak_impl<VecAvx512>(iters); }

}  // namespace attnext::cpu::avx512bf16
