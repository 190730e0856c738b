// Picks the kernel instantiation for a call: dtype x head-dim bucket. The kernels themselves are
// compiled in attention_d<D>.cu, one translation unit per bucket.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

#include "attnext/blocks.h"
#include "cuda/cuda_attention.h"

namespace attnext::cuda {

template <class T, int kD>
Status launch_forward(const FwdParams& p, cudaStream_t stream);
template <class T, int kD>
Status launch_backward(const BwdParams& p, bool deterministic, cudaStream_t stream);

namespace {

thread_local std::string g_last_error;

// Calls fn.template operator()<T, kD>() for the call's dtype and head-dim bucket.
template <class Fn>
Status dispatch(DType dtype, int64_t head_dim, Fn&& fn) {
  if (dtype != DType::kFloat16 && dtype != DType::kBFloat16) return Status::kUnsupportedDType;
  const bool half = dtype == DType::kFloat16;
  switch (cuda_head_dim_bucket(head_dim)) {
    case 32: return half ? fn.template operator()<__half, 32>() : fn.template operator()<__nv_bfloat16, 32>();
    case 64: return half ? fn.template operator()<__half, 64>() : fn.template operator()<__nv_bfloat16, 64>();
    case 96: return half ? fn.template operator()<__half, 96>() : fn.template operator()<__nv_bfloat16, 96>();
    case 128: return half ? fn.template operator()<__half, 128>() : fn.template operator()<__nv_bfloat16, 128>();
    case 192: return half ? fn.template operator()<__half, 192>() : fn.template operator()<__nv_bfloat16, 192>();
    case 256: return half ? fn.template operator()<__half, 256>() : fn.template operator()<__nv_bfloat16, 256>();
    default: return Status::kUnsupportedHeadDim;
  }
}

struct Forward {
  const FwdParams& p;
  cudaStream_t stream;
  template <class T, int kD>
  Status operator()() const { return launch_forward<T, kD>(p, stream); }
};

struct Backward {
  const BwdParams& p;
  bool deterministic;
  cudaStream_t stream;
  template <class T, int kD>
  Status operator()() const { return launch_backward<T, kD>(p, deterministic, stream); }
};

}  // namespace

void set_last_error(const std::string& message) { g_last_error = message; }
const char* last_error() { return g_last_error.c_str(); }

Status forward(const FwdParams& p, void* stream) {
  return dispatch(p.dtype, p.head_dim, Forward{p, static_cast<cudaStream_t>(stream)});
}

int64_t backward_workspace_floats(const FwdParams& p, bool deterministic) {
  const int64_t rows = p.batch * p.heads_q * p.seq_q;
  return rows + (deterministic ? 0 : rows * p.head_dim);
}

Status backward(const BwdParams& p, bool deterministic, void* stream) {
  if (p.workspace_floats < backward_workspace_floats(p.fwd, deterministic)) return Status::kWorkspaceTooSmall;
  return dispatch(p.fwd.dtype, p.fwd.head_dim, Backward{p, deterministic, static_cast<cudaStream_t>(stream)});
}

}  // namespace attnext::cuda
