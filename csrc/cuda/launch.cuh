// Host-side launch of the Ampere+ kernels for one (dtype, head-dim bucket): the shared-memory opt-in, the
// grids, the order of the backward passes. Instantiated once per bucket by attention_d<D>.cu.
#pragma once

#include <cuda_runtime.h>

#include <string>
#include <type_traits>

#include "attnext/params.h"
#include "cuda/tiles.cuh"

namespace attnext::cuda {

void set_last_error(const std::string& message);

inline Status cuda_status(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return Status::kOk;
  set_last_error(std::string(what) + ": " + cudaGetErrorString(err));
  return Status::kCudaError;
}

// The current device's opt-in limit of shared memory per block (0 if it cannot be read).
inline int max_shared_memory_per_block() {
  int device = 0, optin = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess)
    return 0;
  return optin;
}

// Raises the kernel's dynamic shared-memory limit when it needs more than the default 48 KiB.
template <class Kernel>
Status allow_shared_memory(Kernel kernel, int bytes) {
  if (bytes > max_shared_memory_per_block()) return Status::kSharedMemoryTooSmall;
  if (bytes <= 48 * 1024) return Status::kOk;
  return cuda_status(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
                     "cudaFuncSetAttribute");
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Launches kernel<<<grid, threads, smem, stream>>>(args...) after raising its shared-memory limit.
template <class... Params, class... Args>
Status launch(void (*kernel)(Params...), dim3 grid, int threads, int smem, cudaStream_t stream, const char* what,
              const Args&... args) {
  Status s = allow_shared_memory(kernel, smem);
  if (s != Status::kOk) return s;
  kernel<<<grid, threads, smem, stream>>>(args...);
  return cuda_status(cudaGetLastError(), what);
}

template <class T, int kD>
Status launch_forward(const FwdParams& p, cudaStream_t stream) {
  using C = typename Tiles<T, kD>::Fwd;
  if (p.batch * p.heads_q * p.seq_q == 0) return Status::kOk;
  const dim3 grid(unsigned(ceil_div(p.seq_q, C::kBlockM)), unsigned(p.heads_q), unsigned(p.batch));
  return launch(fwd_kernel<C>, grid, C::kThreads, C::kSmemBytes, stream, "attnext forward kernel launch", p);
}

// The key-block pass with configuration C.
template <class C>
Status run_key_pass(const BwdParams& p, const BwdWork& w, cudaStream_t stream) {
  const dim3 grid(unsigned(ceil_div(p.fwd.seq_k, C::kBlockN)), unsigned(p.fwd.heads_kv), unsigned(p.fwd.batch));
  return launch(bwd_kernel<C>, grid, C::kThreads, C::kSmemBytes, stream, "attnext backward kernel launch", p, w);
}

// The deterministic dQ pass with configuration C.
template <class C>
Status run_dq_pass(const BwdParams& p, const BwdWork& w, cudaStream_t stream) {
  const dim3 grid(unsigned(ceil_div(p.fwd.seq_q, C::kBlockM)), unsigned(p.fwd.heads_q), unsigned(p.fwd.batch));
  return launch(bwd_dq_kernel<C>, grid, C::kThreads, C::kSmemBytes, stream, "attnext backward dQ kernel launch",
                p, w);
}

// The backward passes in order; each pass takes the first of its configurations that fits the GPU's
// shared memory per block.
template <class T, int kD>
Status launch_backward(const BwdParams& p, bool deterministic, cudaStream_t stream) {
  using Tl = Tiles<T, kD>;
  const FwdParams& f = p.fwd;
  const bool has_rows = f.batch * f.heads_q * f.seq_q > 0, has_keys = f.batch * f.heads_kv * f.seq_k > 0;
  if (!has_rows && !has_keys) return Status::kOk;
  BwdWork w;
  w.delta = p.workspace;
  w.dq_accum = deterministic ? nullptr : p.workspace + f.batch * f.heads_q * f.seq_q;
  const int smem = max_shared_memory_per_block();
  Status s = Status::kOk;

  const dim3 rows_grid(unsigned(ceil_div(f.seq_q, kPreprocessRows)), unsigned(f.heads_q), unsigned(f.batch));
  if (has_rows &&
      (s = launch(bwd_preprocess_kernel<T>, rows_grid, 128, 0, stream, "attnext backward preprocess launch", p, w)) !=
          Status::kOk)
    return s;
  if (has_keys) {
    if (Tl::Bwd::kSmemBytes <= smem) s = run_key_pass<typename Tl::Bwd>(p, w, stream);
    else if (Tl::BwdOneStage::kSmemBytes <= smem) s = run_key_pass<typename Tl::BwdOneStage>(p, w, stream);
    else s = run_key_pass<typename Tl::BwdSmall>(p, w, stream);
    if (s != Status::kOk) return s;
  }
  if (!has_rows) return Status::kOk;
  if (deterministic) {
    if (Tl::BwdDq::kSmemBytes <= smem) return run_dq_pass<typename Tl::BwdDq>(p, w, stream);
    return run_dq_pass<typename Tl::BwdDqOneStage>(p, w, stream);
  }
  return launch(bwd_convert_dq_kernel<T>, rows_grid, 128, 0, stream, "attnext backward dQ convert launch", p, w);
}

// One translation unit per head-dim bucket instantiates both dtypes.
#define ATTNEXT_INSTANTIATE_BUCKET(D)                                                                 \
  template Status launch_forward<__half, D>(const FwdParams&, cudaStream_t);                          \
  template Status launch_forward<__nv_bfloat16, D>(const FwdParams&, cudaStream_t);                   \
  template Status launch_backward<__half, D>(const BwdParams&, bool, cudaStream_t);                   \
  template Status launch_backward<__nv_bfloat16, D>(const BwdParams&, bool, cudaStream_t);

}  // namespace attnext::cuda
