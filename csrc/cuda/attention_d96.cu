// Forward and backward kernels of head-dim bucket 96, fp16 and bf16.
#include "cuda/launch.cuh"

namespace attnext::cuda {
ATTNEXT_INSTANTIATE_BUCKET(96)
}  // namespace attnext::cuda
