// Forward and backward kernels of head-dim bucket 128, fp16 and bf16.
#include "cuda/launch.cuh"

namespace attnext::cuda {
ATTNEXT_INSTANTIATE_BUCKET(128)
}  // namespace attnext::cuda
