// CPU implementations of the attnext ops: checks, output allocation, torch's thread pool.
#include "cpu/cpu_attention.h"
#include "torch_common.h"

namespace attnext::binding {
namespace {

constexpr const char* kFwdOp = "attnext.attention";
constexpr const char* kBwdOp = "attnext.attention backward";

void torch_parallel_for(int64_t n, void* ctx, RangeFn fn) {
  if (n <= 0) return;
  torch::stable::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) { fn(ctx, begin, end); });
}

void check_cpu(const char* op, const Tensor& t, const char* name) {
  check(t.is_cpu(), op, ": ", name, " is on a CUDA device but this is the CPU kernel");
}

void check_status(const char* op, Status s, const FwdParams& p) {
  if (s == Status::kUnsupportedHeadDim)
    fail(op, ": head_dim ", p.head_dim, " is not supported on CPU (supported: 1..512)");
  check(s == Status::kOk, op, ": CPU kernel failed: ", status_string(s));
}

FwdParams cpu_params(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, double scale,
                     int64_t mask_kind, int64_t wl, int64_t wr, bool bshd) {
  check_cpu(op, q, "q");
  FwdParams p = forward_params(op, q, k, v, scale, mask_kind, wl, wr, bshd);
  p.num_threads = static_cast<int>(torch::stable::get_num_threads());
  p.parallel_for = torch_parallel_for;
  return p;
}

std::tuple<Tensor, Tensor> fwd_cpu(Tensor q, Tensor k, Tensor v, double scale, int64_t mask_kind, int64_t wl,
                                   int64_t wr, bool bshd, bool /*deterministic*/) {
  FwdParams p = cpu_params(kFwdOp, q, k, v, scale, mask_kind, wl, wr, bshd);
  Tensor out = empty_like_contiguous(q);
  Tensor lse = empty_on(q, {p.batch, p.heads_q, p.seq_q}, ScalarType::Float);
  p.out = out.mutable_data_ptr();
  p.out_stride = strides_of(out, bshd);
  p.lse = static_cast<float*>(lse.mutable_data_ptr());
  check_status(kFwdOp, cpu::forward(p), p);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> bwd_cpu(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,
                                           std::optional<Tensor> dlse, double scale, int64_t mask_kind, int64_t wl,
                                           int64_t wr, bool bshd, bool /*deterministic: the CPU backward always is*/) {
  BwdParams bp;
  bp.fwd = cpu_params(kBwdOp, q, k, v, scale, mask_kind, wl, wr, bshd);
  const FwdParams& p = bp.fwd;
  backward_params(bp, kBwdOp, "CPU", dout, q, out, lse, dlse, bshd);

  auto grads = allocate_gradients(bp, q, k, v, bshd);
  Tensor ws = allocate_workspace(bp, q, cpu::backward_workspace_size(p));
  check_status(kBwdOp, cpu::backward(bp), p);
  return grads;
}

cpu::Isa to_isa(int64_t isa) {
  check(isa >= 0 && isa < cpu::kNumIsas, "attnext.set_cpu_isa: unit ", isa,
        " is not known (known: 0 scalar, 1 avx2, 2 avx512, 3 avx512bf16)");
  return static_cast<cpu::Isa>(isa);
}

int64_t cpu_isa() { return static_cast<int64_t>(cpu::active_isa()); }
bool cpu_isa_compiled(int64_t isa) { return cpu::isa_compiled(to_isa(isa)); }
bool cpu_isa_runnable(int64_t isa) { return cpu::isa_runnable(to_isa(isa)); }
bool set_cpu_isa(int64_t isa) { return cpu::set_isa(to_isa(isa)); }
double cpu_fma_peak(int64_t iters) {
  check(iters > 0, "attnext.cpu_fma_peak: iters ", iters, " must be positive");
  return cpu::fma_peak_gflops(iters);
}

}  // namespace
}  // namespace attnext::binding

STABLE_TORCH_LIBRARY_IMPL(attnext, CPU, m) {
  m.impl("fwd", TORCH_BOX(&attnext::binding::fwd_cpu));
  m.impl("fwd_inference", TORCH_BOX(&attnext::binding::fwd_cpu));
  m.impl("bwd", TORCH_BOX(&attnext::binding::bwd_cpu));
}

STABLE_TORCH_LIBRARY_IMPL(attnext, CompositeExplicitAutograd, m) {
  m.impl("cpu_isa", TORCH_BOX(&attnext::binding::cpu_isa));
  m.impl("cpu_isa_compiled", TORCH_BOX(&attnext::binding::cpu_isa_compiled));
  m.impl("cpu_isa_runnable", TORCH_BOX(&attnext::binding::cpu_isa_runnable));
  m.impl("set_cpu_isa", TORCH_BOX(&attnext::binding::set_cpu_isa));
  m.impl("cpu_fma_peak", TORCH_BOX(&attnext::binding::cpu_fma_peak));
}
