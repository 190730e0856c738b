// The CUDA kernels' entry points, seen from the torch binding (csrc/torch_cuda.cpp): torch-free and
// free of CUDA runtime headers, so the binding compiles with the host compiler alone.
#pragma once

#include <cstdint>

#include "attnext/params.h"

namespace attnext::cuda {

// Head dims the CUDA kernels accept: multiples of 8 up to 256 (run on the buckets 32, 64, 96, 128, 192, 256).
constexpr int64_t kMaxHeadDim = 256;

// Forward on `stream` (a cudaStream_t) of the current device; fp16 and bf16 only. Never synchronises.
Status forward(const FwdParams& p, void* stream);

// fp32 workspace the backward needs: Delta (B·Hq·Sq), plus the dQ accumulator (B·Hq·Sq·D) unless deterministic.
int64_t backward_workspace_floats(const FwdParams& p, bool deterministic);

// Backward on `stream`; p.workspace holds backward_workspace_floats(p.fwd, deterministic) floats.
Status backward(const BwdParams& p, bool deterministic, void* stream);

// The CUDA error behind the last Status::kCudaError of the calling thread.
const char* last_error();

}  // namespace attnext::cuda
