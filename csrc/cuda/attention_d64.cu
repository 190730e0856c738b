// Forward and backward kernels of head-dim bucket 64, fp16 and bf16.
#include "cuda/launch.cuh"

namespace attnext::cuda {
ATTNEXT_INSTANTIATE_BUCKET(64)
}  // namespace attnext::cuda
