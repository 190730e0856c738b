"""torch.library.opcheck of the ops (schema, fake kernels, autograd registration, AOT dispatch) and
torch.compile(fullgraph=True) of the public functions against eager."""

import pytest
import torch

import attnext
from helpers import make_qkv

def _bshd_views_expanded(dtype):
    """bshd views of bhsd tensors, k and v expanded along heads (stride 0)."""
    q, k, v = make_qkv(1, 4, 1, 7, 12, 8, dtype)
    return q.transpose(1, 2), k.expand(1, 2, 12, 8).transpose(1, 2), v.expand(1, 2, 12, 8).transpose(1, 2)


# name: (q/k/v builder, scale, mask_kind, window_left, window_right, bshd)
SAMPLES = {
    "plain": (lambda dt: make_qkv(2, 2, 2, 9, 13, 16, dt), 0.25, 0, -1, -1, False),
    "gqa_top_left": (lambda dt: make_qkv(1, 4, 2, 17, 11, 8, dt), 0.3, 1, -1, -1, False),
    "bshd_bottom_right": (lambda dt: make_qkv(2, 4, 1, 13, 9, 16, dt, layout="bshd"), 0.25, 2, -1, -1, True),
    "window": (lambda dt: make_qkv(1, 2, 1, 10, 21, 8, dt), 0.5, 3, 3, 1, False),
    "bshd_view_expanded": (_bshd_views_expanded, 0.2, 2, 2, -1, True),
    "sk0": (lambda dt: make_qkv(1, 2, 2, 5, 0, 8, dt), 0.3, 0, -1, -1, False),
}
OPCHECK_DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", OPCHECK_DTYPES, ids=str)
@pytest.mark.parametrize("sample", SAMPLES)
def test_opcheck_fwd(sample, dtype):
    make, *rest = SAMPLES[sample]
    q, k, v = (t.requires_grad_() for t in make(dtype))
    torch.library.opcheck(torch.ops.attnext.fwd, (q, k, v, *rest, False))
    torch.library.opcheck(torch.ops.attnext.fwd, (q.detach(), k.detach(), v.detach(), *rest),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.attnext.fwd_inference, (q.detach(), k.detach(), v.detach(), *rest),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("with_dlse", [False, True])
@pytest.mark.parametrize("dtype", OPCHECK_DTYPES, ids=str)
@pytest.mark.parametrize("sample", SAMPLES)
def test_opcheck_bwd(sample, dtype, with_dlse):
    make, *rest = SAMPLES[sample]
    q, k, v = make(dtype)
    out, lse = torch.ops.attnext.fwd(q, k, v, *rest)
    dlse = torch.randn_like(lse) if with_dlse else None
    torch.library.opcheck(torch.ops.attnext.bwd, (torch.randn_like(out), q, k, v, out, lse, dlse, *rest, True))


class _SeenOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", ["grad", "no_grad", "inputs_without_grad", "inference_mode"])
def test_inference_op_when_no_gradient_is_needed(case):
    """An eager call runs fwd_inference's kernel, with the same result as fwd; only one that needs a gradient
    gets a grad_fn, EagerFwd's (fwd's registration is for torch.compile, test_compile_keeps_the_op)."""
    q, k, v = make_qkv(1, 4, 2, 9, 13, 16)
    if case != "inputs_without_grad":
        q.requires_grad_()
    want, _ = torch.ops.attnext.fwd(q.detach(), k, v, 0.25, 2, -1, -1, False)
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(case, torch.enable_grad)
    with context(), _SeenOps() as mode:
        out = attnext.attention(q, k, v, causal="bottom_right", scale=0.25)
    assert [op for op in mode.seen if op.namespace == "attnext"] == [torch.ops.attnext.fwd_inference.default]
    assert (out.grad_fn is not None) == (case == "grad")
    if case == "grad":
        assert out.grad_fn.name() == "EagerFwdBackward"
    assert torch.equal(out.detach(), want)


@pytest.mark.parametrize("loss", ["out", "lse", "both"])
@pytest.mark.parametrize("sample", ["plain", "gqa_top_left", "bshd_bottom_right", "window"])
def test_eager_gradients_equal_the_ops(sample, loss):
    """EagerFwd (eager calls) and fwd's torch.library registration (compiled ones) give the same out, lse and
    bitwise the same gradients, whichever of out and lse the loss reads (the other's gradient is None in one
    and a zero tensor in the other)."""
    make, scale, kind, left, right, bshd = SAMPLES[sample]
    inputs = make(torch.float32)
    grads = []
    for fwd in (torch.ops.attnext.fwd, attnext._ops.EagerFwd.apply):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out, lse = fwd(*leaves, scale, kind, left, right, bshd, False)
        g_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        total = {"out": (out * g_out).sum(), "lse": lse.sum(), "both": (out * g_out).sum() + lse.sum()}[loss]
        grads.append((out.detach(), lse.detach(), *torch.autograd.grad(total, leaves)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated", "ignore::torch.jit.TracerWarning")
def test_jit_trace_keeps_the_op():
    """torch.jit.trace of a call that needs a gradient records attnext::fwd (a graph it can save), not EagerFwd."""
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 2, 9, 9, 16))
    traced = torch.jit.trace(lambda q, k, v: attnext.attention(q, k, v), (q, k, v), check_trace=False)
    assert "attnext::fwd" in str(traced.graph) and "PythonOp" not in str(traced.graph)


def test_compile_keeps_the_op():
    """Under torch.compile a call that needs a gradient is traced as attnext::fwd (whose registration the
    compiler reads), not through EagerFwd."""
    targets = []

    def backend(gm, example_inputs):
        targets.extend(node.target for node in gm.graph.nodes)
        return gm.forward

    compiled = torch.compile(lambda q, k, v: attnext.attention(q, k, v, causal=True), backend=backend, fullgraph=True)
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 2, 9, 9, 16))
    compiled(q, k, v).sum().backward()
    assert torch.ops.attnext.fwd.default in targets
    assert q.grad is not None


def test_fake_shapes():
    """The fake kernels give the real kernels' shapes, dtypes and strides (bshd: out in bshd, lse (B, H, S))."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = make_qkv(2, 4, 2, 9, 13, 16, torch.float16, layout="bshd")
    real = torch.ops.attnext.fwd(q, k, v, 0.25, 2, -1, -1, True)
    with FakeTensorMode() as mode:
        fake = torch.ops.attnext.fwd(*(mode.from_tensor(t) for t in (q, k, v)), 0.25, 2, -1, -1, True)
    for a, b in zip(real, fake):
        assert a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride()
    assert real[1].shape == (2, 4, 9) and real[1].dtype == torch.float32


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_compile_attention_forward_backward(layout):
    """fullgraph compile of a block around attention (GQA, a causal mask, lse in the loss); out, lse, the loss
    and the gradients equal eager."""
    def fn(q, k, v):
        out, lse = attnext.attention(q * 0.5, k, v, causal="bottom_right", layout=layout, return_lse=True,
                                     scale=0.3)
        loss = (out.float() ** 2).sum() + torch.where(torch.isfinite(lse), lse, 0).sum()
        return out, lse, loss

    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    q, k, v = make_qkv(2, 4, 2, 19, 23, 16, layout=layout)
    eager_leaves, comp_leaves = ([t.clone().requires_grad_() for t in (q, k, v)] for _ in range(2))
    want, got = fn(*eager_leaves), compiled(*comp_leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(torch.autograd.grad(got[2], comp_leaves), torch.autograd.grad(want[2], eager_leaves)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_compile_sdpa():
    """fullgraph compile of the SDPA drop-in (4-D with GQA and 3-D), equal to eager."""
    def fn(q, k, v, q3, k3, v3):
        a = attnext.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        b = attnext.scaled_dot_product_attention(q3, k3, v3, scale=0.5)
        return a, b

    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    args = (*make_qkv(2, 4, 1, 11, 17, 16, torch.bfloat16), *(torch.randn(3, n, 8) for n in (6, 9, 9)))
    for got, want in zip(compiled(*args), fn(*args)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_compile_under_autocast():
    """fullgraph compile inside torch.autocast: the cast to its dtype is traced with the op, as in eager."""
    q, k, v = make_qkv(1, 2, 2, 9, 11, 16)
    compiled = torch.compile(lambda q, k, v: attnext.attention(q, k, v, causal=True), fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = compiled(q, k, v), attnext.attention(q, k, v, causal=True)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non_strict"])
def test_export_keeps_the_op(strict):
    """torch.export of a module around attention (its Linear's weights need gradients): the graph holds
    attnext::fwd, and the exported module gives eager's output."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 16)

        def forward(self, q, k, v):
            return attnext.attention(self.proj(q), k, v, causal=True)

    block, args = Block(), make_qkv(1, 2, 2, 9, 9, 16)
    exported = torch.export.export(block, args, strict=strict)
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert torch.ops.attnext.fwd.default in targets
    assert torch.equal(exported.module()(*args), block(*args))
