// The portable unit: built for every target, with the compiler's baseline flags.
#include "cpu/vec_scalar.h"
#include "cpu/backward_impl.h"
#include "cpu/cpu_attention.h"
#include "cpu/forward_impl.h"
#include "cpu/peak.h"

namespace attnext::cpu::scalar {

Status forward(const FwdParams& p) { return forward_impl<VecScalar>(p); }
Status backward(const BwdParams& p) { return backward_impl<VecScalar>(p); }
double fma_peak(int64_t iters) { return fma_peak_impl<VecScalar>(iters); }

}  // namespace attnext::cpu::scalar
