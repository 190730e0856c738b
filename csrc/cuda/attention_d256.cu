// Forward and backward kernels of head-dim bucket 256, fp16 and bf16.
#include "cuda/launch.cuh"

namespace attnext::cuda {
ATTNEXT_INSTANTIATE_BUCKET(256)
}  // namespace attnext::cuda
