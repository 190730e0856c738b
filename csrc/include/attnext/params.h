// The kernel contract: what every backend (CPU, CUDA) is given and what it returns.
// Torch-free and CUDA-runtime-free, so kernels and their C++ tests build without either.
#pragma once

#include <cstdint>

#include "attnext/mask.h"

namespace attnext {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

enum class Status : int32_t {
  kOk = 0,
  kUnsupportedDType,
  kUnsupportedHeadDim,
  kBadShape,
  kBadStride,
  kWorkspaceTooSmall,
  kSharedMemoryTooSmall,
  kCudaError,
};

inline const char* status_string(Status s) {
  switch (s) {
    case Status::kOk: return "ok";
    case Status::kUnsupportedDType: return "unsupported dtype";
    case Status::kUnsupportedHeadDim: return "unsupported head dim";
    case Status::kBadShape: return "bad shape";
    case Status::kBadStride: return "bad stride (last dim must be contiguous)";
    case Status::kWorkspaceTooSmall: return "workspace too small";
    case Status::kSharedMemoryTooSmall: return "the kernel needs more shared memory per block than this GPU offers";
    case Status::kCudaError: return "CUDA error";
  }
  return "unknown status";
}

// Strides (in elements) of a 4-D tensor read as (batch, head, seq, dim); the dim stride is 1.
struct Strides {
  int64_t b = 0, h = 0, s = 0;
};

// A parallel-for supplied by the caller (torch's pool in the extension, a plain loop in C++ tests):
// calls fn(ctx, begin, end) over disjoint sub-ranges that cover [0, n).
using RangeFn = void (*)(void* ctx, int64_t begin, int64_t end);
using ParallelFor = void (*)(int64_t n, void* ctx, RangeFn fn);

// Forward: out = softmax(Q Kᵀ · scale + mask) V, lse = log Σ_j exp(Q Kᵀ · scale) per row.
struct FwdParams {
  const void* q = nullptr;  // (B, Hq, Sq, D)
  const void* k = nullptr;  // (B, Hkv, Sk, D)
  const void* v = nullptr;  // (B, Hkv, Sk, D)
  void* out = nullptr;      // (B, Hq, Sq, D), same dtype as q
  float* lse = nullptr;     // (B, Hq, Sq) contiguous, natural log; -inf for rows with no visible key
  Strides q_stride, k_stride, v_stride, out_stride;
  int64_t batch = 0, heads_q = 0, heads_kv = 0, seq_q = 0, seq_k = 0, head_dim = 0;
  DType dtype = DType::kFloat32;
  float scale = 1.0f;
  MaskSpec mask;
  int num_threads = 1;
  ParallelFor parallel_for = nullptr;
};

// Backward: given dO and the forward's O and lse, returns dQ, dK, dV (dK, dV summed over each GQA group).
struct BwdParams {
  FwdParams fwd;              // q, k, v, out, lse of the forward (out and lse are read, not written)
  const void* dout = nullptr; // (B, Hq, Sq, D)
  void* dq = nullptr;         // (B, Hq, Sq, D); like dk and dv, must not overlap any input
  void* dk = nullptr;         // (B, Hkv, Sk, D)
  void* dv = nullptr;         // (B, Hkv, Sk, D)
  const float* dlse = nullptr;  // optional (B, Hq, Sq) contiguous gradient of lse; nullptr means zero
  Strides dout_stride, dq_stride, dk_stride, dv_stride;
  float* workspace = nullptr;  // cpu_backward_workspace_floats(...) floats, no alignment needed
  int64_t workspace_floats = 0;
};

}  // namespace attnext
