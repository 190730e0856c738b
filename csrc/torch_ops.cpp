// The op schemas of the attnext namespace (one definition for every device) and the module stub
// that lets `import attnext._C` load this library and run its registrations.
#include <Python.h>

#include "torch_common.h"

STABLE_TORCH_LIBRARY(attnext, m) {
  // mask_kind: 0 none, 1 causal top-left, 2 causal bottom-right, 3 window (left, right; -1 = unbounded).
  // bshd: q, k, v (and out) are (batch, seq, heads, head_dim) instead of (batch, heads, seq, head_dim).
  // deterministic is not used by the forward (always deterministic); autograd hands it to bwd.
  m.def("fwd(Tensor q, Tensor k, Tensor v, float scale, int mask_kind, int window_left, int window_right, "
        "bool bshd, bool deterministic=False) -> (Tensor out, Tensor lse)");
  // fwd without an autograd formula, for calls that need no gradient (inference, decoding): the
  // dispatcher then goes straight to the kernel instead of through fwd's Python autograd registration.
  m.def("fwd_inference(Tensor q, Tensor k, Tensor v, float scale, int mask_kind, int window_left, "
        "int window_right, bool bshd, bool deterministic=False) -> (Tensor out, Tensor lse)");
  // dlse: optional gradient of lse (for callers that differentiate through it), else zero.
  m.def("bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, float scale, "
        "int mask_kind, int window_left, int window_right, bool bshd, bool deterministic) "
        "-> (Tensor dq, Tensor dk, Tensor dv)");
  // CPU vector units: 0 scalar, 1 avx2, 2 avx512, 3 avx512bf16.
  m.def("cpu_isa() -> int");
  m.def("cpu_isa_compiled(int isa) -> bool");
  m.def("cpu_isa_runnable(int isa) -> bool");
  m.def("set_cpu_isa(int isa) -> bool");
  // GFLOP/s of a pure FMA loop of the active CPU unit on the calling thread: the per-core ceiling.
  m.def("cpu_fma_peak(int iters) -> float");
}

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "attnext CPU kernels (ops in torch.ops.attnext)", -1,
                               nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
