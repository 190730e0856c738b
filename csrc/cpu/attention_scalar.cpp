// The portable unit: built for every target, with the compiler's baseline flags.
#include "cpu/vec_scalar.h"
#include "cpu/backward_impl.h"
#include "cpu/cpu_attention.h"
#include "cpu/forward_impl.h"

namespace attnext::cpu::scalar {

Status forward(const FwdParams& p) { return forward_impl<VecScalar>(p); }
Status backward(const BwdParams& p) { return backward_impl<VecScalar>(p); }

}  // namespace attnext::cpu::scalar
