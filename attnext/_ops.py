"""The attnext ops: loading the native modules, fake kernels for torch.compile, and autograd.

The ops themselves (schemas and CPU/CUDA kernels) live in C++ under torch.ops.attnext:
  fwd(q, k, v, scale, mask_kind, window_left, window_right, bshd, deterministic=False) -> (out, lse)
  fwd_inference(the same arguments) -> (out, lse): fwd without autograd, for calls that need no gradient
      (and, through EagerFwd and FuncFwd below, for eager calls that do, and under torch.func.grad)
  bwd(dout, q, k, v, out, lse, dlse, scale, mask_kind, window_left, window_right, bshd, deterministic)
      -> (dq, dk, dv)
"""

import importlib
import importlib.util

import torch
import torch.autograd.forward_ad as forward_ad

from attnext import _nvtx
from attnext import _C  # noqa: F401  (loading it registers torch.ops.attnext.*)


def _load_cuda_module():
    """Imports attnext._C_cuda when it was built; returns None on success, else why it is unavailable."""
    if importlib.util.find_spec("attnext._C_cuda") is None:
        return "attnext was built without its CUDA module (see python -m attnext.info)"
    try:
        importlib.import_module("attnext._C_cuda")
    except ImportError as exc:  # e.g. built for a CUDA torch while this torch has none
        return f"attnext._C_cuda failed to load: {exc}"
    return None


CUDA_MODULE_ERROR = _load_cuda_module()

MASK_NONE, MASK_CAUSAL_TOP_LEFT, MASK_CAUSAL_BOTTOM_RIGHT, MASK_WINDOW = 0, 1, 2, 3


def _bhs(t, bshd):
    """(batch, heads, seq) of a 4-D tensor in either layout."""
    return (t.shape[0], t.shape[2], t.shape[1]) if bshd else (t.shape[0], t.shape[1], t.shape[2])


@torch.library.register_fake("attnext::fwd_inference")
@torch.library.register_fake("attnext::fwd")
def _fwd_fake(q, k, v, scale, mask_kind, window_left, window_right, bshd, deterministic=False):
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "attnext.attention: inputs must be 4-D")
    torch._check(q.dtype == k.dtype == v.dtype, lambda: "attnext.attention: q, k and v must have the same dtype")
    return q.new_empty(q.shape), q.new_empty(_bhs(q, bshd), dtype=torch.float32)


@torch.library.register_fake("attnext::bwd")
def _bwd_fake(dout, q, k, v, out, lse, dlse, scale, mask_kind, window_left, window_right, bshd, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, mask_kind, window_left, window_right, bshd = inputs[:8]
    deterministic = inputs[8] if len(inputs) > 8 else False
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = (scale, mask_kind, window_left, window_right, bshd, deterministic)


def _cuda_misaligned(t):
    """The CUDA kernels copy 16-byte row chunks: rows must start on 16-byte boundaries."""
    return t.numel() > 0 and (t.data_ptr() % 16 != 0 or any(s % 8 for s in t.stride()[:-1]))


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    scale, mask_kind, window_left, window_right, bshd, deterministic = ctx.args
    deterministic = deterministic or torch.are_deterministic_algorithms_enabled()  # the CUDA dQ's order
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    elif grad_out.stride(-1) != 1 or (grad_out.is_cuda and _cuda_misaligned(grad_out)):
        grad_out = grad_out.contiguous()  # e.g. the expanded gradient of out.sum(): the kernels need stride 1
    dlse = None if grad_lse is None else grad_lse.contiguous()
    with _nvtx.op_range("attnext.bwd", q, k, mask_kind, window_left, window_right, bshd):
        dq, dk, dv = torch.ops.attnext.bwd(grad_out, q, k, v, out, lse, dlse, scale, mask_kind, window_left,
                                           window_right, bshd, deterministic)
    if torch.is_grad_enabled():  # backward(create_graph=True): dq, dk and dv must not be differentiated again
        dq, dk, dv = _NotDifferentiable.apply(dq, dk, dv)
    return dq, dk, dv, None, None, None, None, None, None


class _NotDifferentiable(torch.autograd.Function):
    """The gradients of a backward run with create_graph=True (as torch.func.grad runs it), as they are;
    differentiating them raises. The backward kernel has no gradient of its own: without this mark, torch would
    warn and take its gradient as 0."""

    generate_vmap_rule = True

    @staticmethod
    def forward(dq, dk, dv):
        return dq.detach(), dk.detach(), dv.detach()  # not views: the caller may edit them in place

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("attnext.attention: double backward (differentiating the gradients of q, k or v again, "
                           "as a gradient penalty does) is not supported (supported: first-order gradients)")


torch.library.register_autograd("attnext::fwd", _backward, setup_context=_setup_context)


class EagerFwd(torch.autograd.Function):
    """fwd with its gradient for eager calls: the kernel of fwd_inference, the same saved tensors and the same
    backward as fwd's registration above, without the Python layers that torch.library puts around it
    (which also binds the arguments by signature on every call). torch.compile keeps to the op: its graph
    holds attnext::fwd, whose registration it reads. An lse or out that takes no part in the loss reaches
    backward as None (no zero tensor is made for it)."""

    @staticmethod
    def forward(ctx, q, k, v, scale, mask_kind, window_left, window_right, bshd, deterministic):
        ctx.set_materialize_grads(False)
        inputs = (q, k, v, scale, mask_kind, window_left, window_right, bshd, deterministic)
        output = torch.ops.attnext.fwd_inference(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    backward = staticmethod(_backward)


FORWARD_AD_ERROR = ("attnext.attention: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad dual tensors) "
                    "is not supported (supported: reverse-mode autograd, torch.func.grad, vmap)")


class FuncFwd(torch.autograd.Function):
    """fwd with its gradient under torch.func.grad (and vjp, jacrev), which needs a Function of this form:
    forward without ctx, setup_context, and a vmap rule (generated: under vmap the ops run once per batch
    entry). The same kernel, saved tensors and backward as EagerFwd. Forward-mode AD raises: the kernels have
    no tangent formula (transform_fwd raises first; jvp is the guard for any other way in)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, scale, mask_kind, window_left, window_right, bshd, deterministic):
        return torch.ops.attnext.fwd_inference(q, k, v, scale, mask_kind, window_left, window_right, bshd,
                                               deterministic)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(FORWARD_AD_ERROR)


_GRAD, _JVP = torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp


def transform_fwd(q, k, v, needs_grad):
    """The fwd for an eager call under torch.func transforms or inside a forward-AD dual level (a private
    torch attribute, forward_ad._current_level, says whether one is open): an error under torch.func.jvp or
    when q, k or v carries a dual tangent (the kernels would drop it); FuncFwd under torch.func.grad (whose
    inputs may not show requires_grad inside a vmap) or when a gradient is needed; else fwd_inference, which
    vmap and functionalize take as any op."""
    transforms = {interpreter.key() for interpreter in torch._C._functorch.get_interpreter_stack() or ()}
    if _JVP in transforms or (forward_ad._current_level >= 0 and any(
            forward_ad.unpack_dual(t).tangent is not None for t in (q, k, v))):
        raise NotImplementedError(FORWARD_AD_ERROR)
    return FuncFwd.apply if needs_grad or _GRAD in transforms else torch.ops.attnext.fwd_inference.default


CPU_UNITS = ("scalar", "avx2", "avx512", "avx512bf16")


def cpu_unit():
    """Name of the CPU vector unit in use."""
    return CPU_UNITS[torch.ops.attnext.cpu_isa()]


def cpu_units_runnable():
    """Names of the CPU vector units built into attnext._C that this CPU can run."""
    return [name for i, name in enumerate(CPU_UNITS) if torch.ops.attnext.cpu_isa_runnable(i)]


def set_cpu_unit(name):
    """Selects the CPU vector unit (one of cpu_units_runnable()); returns the previous one."""
    if name not in CPU_UNITS:
        raise ValueError(f"attnext.set_cpu_unit: unit {name!r} is not known (known: {', '.join(CPU_UNITS)})")
    previous = cpu_unit()
    if not torch.ops.attnext.set_cpu_isa(CPU_UNITS.index(name)):
        raise ValueError(f"attnext.set_cpu_unit: unit {name!r} cannot run here "
                         f"(runnable: {', '.join(cpu_units_runnable())})")
    return previous
