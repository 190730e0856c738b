// Forward and backward kernels of head-dim bucket 32, fp16 and bf16.
#include "cuda/launch.cuh"

namespace attnext::cuda {
ATTNEXT_INSTANTIATE_BUCKET(32)
}  // namespace attnext::cuda
