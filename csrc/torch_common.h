// Shared by the torch binding files (CPU and CUDA): turning stable-ABI tensors into the kernel
// contract, with every input check and its message. Only files named csrc/torch_* include torch.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "attnext/mask.h"
#include "attnext/params.h"

namespace attnext::binding {

using torch::stable::Tensor;
using torch::headeronly::ScalarType;

template <class... Args>
[[noreturn]] void fail(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  throw std::runtime_error(os.str());
}

template <class... Args>
void check(bool cond, const Args&... args) {
  if (!cond) fail(args...);
}

// Message pieces that are formatted only when a message is written: check() takes its arguments on every
// call, and building strings there would cost each call microseconds.
struct DtypeText { ScalarType t; };
inline DtypeText dtype_text(ScalarType t) { return {t}; }
inline std::ostream& operator<<(std::ostream& os, DtypeText d) {
  switch (d.t) {
    case ScalarType::Float: return os << "float32";
    case ScalarType::Half: return os << "float16";
    case ScalarType::BFloat16: return os << "bfloat16";
    case ScalarType::Double: return os << "float64";
    case ScalarType::Byte: return os << "uint8";
    case ScalarType::Char: return os << "int8";
    case ScalarType::Short: return os << "int16";
    case ScalarType::Int: return os << "int32";
    case ScalarType::Long: return os << "int64";
    case ScalarType::Bool: return os << "bool";
    default: return os << torch::headeronly::toString(d.t);
  }
}

struct ShapeText { const Tensor& t; };
inline ShapeText shape_text(const Tensor& t) { return {t}; }
inline std::ostream& operator<<(std::ostream& os, ShapeText s) {
  os << "(";
  for (int64_t i = 0; i < s.t.dim(); ++i) os << (i ? ", " : "") << s.t.size(i);
  return os << ")";
}

inline DType to_dtype(const char* op, ScalarType t) {
  switch (t) {
    case ScalarType::Float: return DType::kFloat32;
    case ScalarType::Half: return DType::kFloat16;
    case ScalarType::BFloat16: return DType::kBFloat16;
    default: fail(op, ": dtype ", dtype_text(t), " is not supported (supported: float32, float16, bfloat16)");
  }
}

// A 4-D tensor read as (batch, head, seq, dim): bhsd is the tensor's own order, bshd swaps axes 1 and 2.
struct View4 {
  int64_t batch, heads, seq, dim;
  Strides stride;
};

inline View4 view4(const char* op, const char* name, const Tensor& t, bool bshd) {
  check(t.dim() == 4, op, ": ", name, " must be a 4-D tensor ", bshd ? "(batch, seq, heads, head_dim)" :
        "(batch, heads, seq, head_dim)", ", got shape ", shape_text(t));
  const auto size = t.sizes(), stride = t.strides();  // one call into torch each, not one per element
  const bool empty = size[0] == 0 || size[1] == 0 || size[2] == 0 || size[3] == 0;
  check(empty || size[3] <= 1 || stride[3] == 1, op, ": ", name,
        " must have a contiguous last dim (stride 1), got stride ", stride[3]);
  const int h = bshd ? 2 : 1, s = bshd ? 1 : 2;
  return {size[0], size[h], size[s], size[3], {stride[0], stride[h], stride[s]}};
}

inline MaskKind to_mask_kind(const char* op, int64_t kind) {
  check(kind >= 0 && kind <= 3, op, ": mask kind ", kind,
        " is not supported (supported: 0 none, 1 causal top-left, 2 causal bottom-right, 3 window)");
  return static_cast<MaskKind>(kind);
}

// The forward's shape, dtype and device checks; fills everything of FwdParams except pointers to outputs.
inline FwdParams forward_params(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, double scale,
                                int64_t mask_kind, int64_t window_left, int64_t window_right, bool bshd) {
  const View4 vq = view4(op, "q", q, bshd), vk = view4(op, "k", k, bshd), vv = view4(op, "v", v, bshd);
  check(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
        ": q, k and v must have the same dtype, got ", dtype_text(q.scalar_type()), ", ",
        dtype_text(k.scalar_type()), ", ", dtype_text(v.scalar_type()));
  check(k.get_device() == q.get_device() && v.get_device() == q.get_device() && k.is_cuda() == q.is_cuda() &&
            v.is_cuda() == q.is_cuda(),
        op, ": q, k and v must be on the same device");
  check(vk.batch == vq.batch && vv.batch == vq.batch, op, ": batch sizes differ: q ", vq.batch, ", k ", vk.batch,
        ", v ", vv.batch);
  check(vk.dim == vq.dim && vv.dim == vq.dim, op, ": head dims differ: q ", vq.dim, ", k ", vk.dim, ", v ", vv.dim,
        " (q, k and v must share one head dim)");
  check(vk.heads == vv.heads && vk.seq == vv.seq, op, ": k and v shapes differ: k ", shape_text(k), ", v ",
        shape_text(v));
  check(vk.heads > 0 ? vq.heads % vk.heads == 0 : vq.heads == 0, op, ": query heads ", vq.heads,
        " must be a multiple of key/value heads ", vk.heads);
  check(window_left >= -1 && window_right >= -1, op, ": window (", window_left, ", ", window_right,
        ") is not supported (each side -1 for unbounded or >= 0)");
  FwdParams p;
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.q_stride = vq.stride;
  p.k_stride = vk.stride;
  p.v_stride = vv.stride;
  p.batch = vq.batch;
  p.heads_q = vq.heads;
  p.heads_kv = vk.heads;
  p.seq_q = vq.seq;
  p.seq_k = vk.seq;
  p.head_dim = vq.dim;
  p.dtype = to_dtype(op, q.scalar_type());
  p.scale = static_cast<float>(scale);
  p.mask = make_mask(to_mask_kind(op, mask_kind), vq.seq, vk.seq, window_left, window_right);
  return p;
}

// The backward's checks of out, grad_out, lse and dlse against the forward's params p (from
// forward_params); fills bp except the gradients' pointers and the workspace. device names the kernel's
// device in messages ("CPU" or "CUDA"); every tensor must be on q's device.
inline void backward_params(BwdParams& bp, const char* op, const char* device, const Tensor& dout, const Tensor& q,
                            const Tensor& out, const Tensor& lse, const std::optional<Tensor>& dlse, bool bshd) {
  const FwdParams& p = bp.fwd;
  const View4 vo = view4(op, "out", out, bshd), vd = view4(op, "grad_out", dout, bshd);
  check(vo.batch == p.batch && vo.heads == p.heads_q && vo.seq == p.seq_q && vo.dim == p.head_dim &&
            vd.batch == p.batch && vd.heads == p.heads_q && vd.seq == p.seq_q && vd.dim == p.head_dim,
        op, ": out ", shape_text(out), " and grad_out ", shape_text(dout), " must have q's shape ",
        shape_text(q));
  check(out.scalar_type() == q.scalar_type() && dout.scalar_type() == q.scalar_type(), op,
        ": out and grad_out must have q's dtype ", dtype_text(q.scalar_type()), ", got ",
        dtype_text(out.scalar_type()), " and ", dtype_text(dout.scalar_type()));
  auto same_device = [&](const Tensor& t) { return t.is_cuda() == q.is_cuda() && t.get_device() == q.get_device(); };
  check(same_device(out) && same_device(dout) && same_device(lse), op, ": out, grad_out and lse must be ", device,
        " tensors on q's device");
  check(lse.scalar_type() == ScalarType::Float && lse.dim() == 3 && lse.size(0) == p.batch &&
            lse.size(1) == p.heads_q && lse.size(2) == p.seq_q && lse.is_contiguous(),
        op, ": lse must be a contiguous float32 tensor of shape (", p.batch, ", ", p.heads_q, ", ", p.seq_q,
        "), got ", dtype_text(lse.scalar_type()), " ", shape_text(lse));
  bp.fwd.out = const_cast<void*>(out.const_data_ptr());
  bp.fwd.out_stride = vo.stride;
  bp.fwd.lse = static_cast<float*>(const_cast<void*>(lse.const_data_ptr()));
  if (dlse.has_value()) {
    check(dlse->scalar_type() == ScalarType::Float && same_device(*dlse) && dlse->dim() == 3 &&
              dlse->size(0) == p.batch && dlse->size(1) == p.heads_q && dlse->size(2) == p.seq_q &&
              dlse->is_contiguous(),
          op, ": dlse must be a contiguous float32 ", device, " tensor shaped like lse, got ",
          dtype_text(dlse->scalar_type()), " ", shape_text(*dlse));
    bp.dlse = static_cast<const float*>(dlse->const_data_ptr());
  }
  bp.dout = dout.const_data_ptr();
  bp.dout_stride = vd.stride;
}

// A new contiguous tensor of the given sizes and dtype on t's device. aoti_torch_empty_strided is one call
// into torch; torch::stable::new_empty finds aten::new_empty by name and runs it through the dispatcher on
// every call, which costs tens of microseconds when that path has left the caches (a call after other work).
inline Tensor empty_on(const Tensor& t, const std::vector<int64_t>& sizes, ScalarType dtype) {
  std::vector<int64_t> strides(sizes.size());
  int64_t stride = 1;
  for (size_t i = sizes.size(); i-- > 0;) {
    strides[i] = stride;
    stride *= std::max<int64_t>(sizes[i], 1);
  }
  int32_t device_type, device_index;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_type(t.get(), &device_type));
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_index(t.get(), &device_index));
  AtenTensorHandle handle;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(
      static_cast<int64_t>(sizes.size()), sizes.data(), strides.data(),
      torch::stable::detail::to<int32_t>(torch::stable::detail::from(dtype)), device_type, device_index, &handle));
  return Tensor(handle);
}

// A contiguous tensor shaped like t (same layout order), on t's device.
inline Tensor empty_like_contiguous(const Tensor& t) {
  const auto sizes = t.sizes();
  return empty_on(t, std::vector<int64_t>(sizes.begin(), sizes.end()), t.scalar_type());
}

inline Strides strides_of(const Tensor& t, bool bshd) {
  return bshd ? Strides{t.stride(0), t.stride(2), t.stride(1)} : Strides{t.stride(0), t.stride(1), t.stride(2)};
}

// dq, dk, dv allocated contiguous like q, k, v, and pointed to by bp.
inline std::tuple<Tensor, Tensor, Tensor> allocate_gradients(BwdParams& bp, const Tensor& q, const Tensor& k,
                                                             const Tensor& v, bool bshd) {
  Tensor dq = empty_like_contiguous(q), dk = empty_like_contiguous(k), dv = empty_like_contiguous(v);
  bp.dq = dq.mutable_data_ptr();
  bp.dk = dk.mutable_data_ptr();
  bp.dv = dv.mutable_data_ptr();
  bp.dq_stride = strides_of(dq, bshd);
  bp.dk_stride = strides_of(dk, bshd);
  bp.dv_stride = strides_of(dv, bshd);
  return {dq, dk, dv};
}

// An fp32 workspace of n floats on t's device, pointed to by bp.
inline Tensor allocate_workspace(BwdParams& bp, const Tensor& t, int64_t n) {
  Tensor ws = empty_on(t, {n}, ScalarType::Float);
  bp.workspace = static_cast<float*>(ws.mutable_data_ptr());
  bp.workspace_floats = n;
  return ws;
}

}  // namespace attnext::binding
