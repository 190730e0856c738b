// CUDA implementations of the attnext ops: checks, output and workspace allocation through torch's
// caching allocator, the current device and stream. Launches never synchronise, so the ops can be
// captured in CUDA graphs.
#include <Python.h>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>

#include "cuda/cuda_attention.h"
#include "attnext/blocks.h"
#include "torch_common.h"

namespace attnext::binding {
namespace {

constexpr const char* kFwdOp = "attnext.attention";
constexpr const char* kBwdOp = "attnext.attention backward";
constexpr int64_t kMaxGridDim = 65535;  // heads and batch are grid dimensions y and z

void* current_stream(int32_t device) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device, &stream));
  return stream;
}

// The kernels copy 16-byte chunks with cp.async: rows must start on 16-byte boundaries.
void check_aligned(const char* op, const char* name, const Tensor& t, bool bshd) {
  if (t.numel() == 0) return;
  const Strides s = strides_of(t, bshd);
  const bool ok = reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0 && s.b % 8 == 0 && s.h % 8 == 0 &&
                  s.s % 8 == 0;
  check(ok, op, ": ", name, " must have a 16-byte aligned data pointer and batch/head/seq strides that are "
        "multiples of 8 elements on CUDA, got strides (", s.b, ", ", s.h, ", ", s.s, ")");
}

void check_status(const char* op, Status s, const FwdParams& p) {
  if (s == Status::kUnsupportedDType)
    fail(op, ": dtype float32 is not supported on CUDA (supported: float16, bfloat16; cast q, k and v to one of them)");
  if (s == Status::kUnsupportedHeadDim)
    fail(op, ": head_dim ", p.head_dim, " is not supported on CUDA (supported: 8..", cuda::kMaxHeadDim,
         ", multiple of 8)");
  if (s == Status::kCudaError) fail(op, ": ", cuda::last_error());
  check(s == Status::kOk, op, ": CUDA kernel failed for head_dim ", p.head_dim, ": ", status_string(s));
}

FwdParams cuda_params(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, double scale,
                      int64_t mask_kind, int64_t wl, int64_t wr, bool bshd) {
  check(q.is_cuda(), op, ": q is on the CPU but this is the CUDA kernel");
  FwdParams p = forward_params(op, q, k, v, scale, mask_kind, wl, wr, bshd);
  check(p.dtype != DType::kFloat32, op,
        ": dtype float32 is not supported on CUDA (supported: float16, bfloat16; cast q, k and v to one of them)");
  check(cuda_head_dim_bucket(p.head_dim) != 0, op, ": head_dim ", p.head_dim,
        " is not supported on CUDA (supported: 8..", cuda::kMaxHeadDim, ", multiple of 8)");
  check(p.batch <= kMaxGridDim && p.heads_q <= kMaxGridDim, op, ": batch ", p.batch, " and query heads ",
        p.heads_q, " must each be at most ", kMaxGridDim, " on CUDA");
  check_aligned(op, "q", q, bshd);
  check_aligned(op, "k", k, bshd);
  check_aligned(op, "v", v, bshd);
  return p;
}

std::tuple<Tensor, Tensor> fwd_cuda(Tensor q, Tensor k, Tensor v, double scale, int64_t mask_kind, int64_t wl,
                                    int64_t wr, bool bshd, bool /*deterministic: the forward always is*/) {
  FwdParams p = cuda_params(kFwdOp, q, k, v, scale, mask_kind, wl, wr, bshd);
  torch::stable::accelerator::DeviceGuard guard(q.get_device());
  Tensor out = empty_like_contiguous(q);
  Tensor lse = empty_on(q, {p.batch, p.heads_q, p.seq_q}, ScalarType::Float);
  p.out = out.mutable_data_ptr();
  p.out_stride = strides_of(out, bshd);
  p.lse = static_cast<float*>(lse.mutable_data_ptr());
  check_status(kFwdOp, cuda::forward(p, current_stream(q.get_device())), p);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> bwd_cuda(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,
                                            std::optional<Tensor> dlse, double scale, int64_t mask_kind, int64_t wl,
                                            int64_t wr, bool bshd, bool deterministic) {
  BwdParams bp;
  bp.fwd = cuda_params(kBwdOp, q, k, v, scale, mask_kind, wl, wr, bshd);
  const FwdParams& p = bp.fwd;
  backward_params(bp, kBwdOp, "CUDA", dout, q, out, lse, dlse, bshd);
  check_aligned(kBwdOp, "out", out, bshd);
  check_aligned(kBwdOp, "grad_out", dout, bshd);
  torch::stable::accelerator::DeviceGuard guard(q.get_device());

  auto grads = allocate_gradients(bp, q, k, v, bshd);
  Tensor ws = allocate_workspace(bp, q, cuda::backward_workspace_floats(p, deterministic));
  check_status(kBwdOp, cuda::backward(bp, deterministic, current_stream(q.get_device())), p);
  return grads;
}

}  // namespace
}  // namespace attnext::binding

STABLE_TORCH_LIBRARY_IMPL(attnext, CUDA, m) {
  m.impl("fwd", TORCH_BOX(&attnext::binding::fwd_cuda));
  m.impl("fwd_inference", TORCH_BOX(&attnext::binding::fwd_cuda));
  m.impl("bwd", TORCH_BOX(&attnext::binding::bwd_cuda));
}

PyMODINIT_FUNC PyInit__C_cuda(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda", "attnext CUDA kernels (ops in torch.ops.attnext)",
                               -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
