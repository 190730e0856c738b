"""torch.func transforms and forward-mode AD: grad, vmap and jacrev give what autograd gives; forward-mode AD
(which the kernels have no formula for) and differentiating the gradients again raise."""

import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import attnext
from attnext.reference import attention_reference
from helpers import DTYPES, make_qkv

FORWARD_AD = r"attnext\.attention: forward-mode AD .* is not supported \(supported: reverse-mode autograd"
DOUBLE_BACKWARD = r"attnext\.attention: double backward .* is not supported"
# torch.func.jvp's first use registers torch's own decompositions through torch.jit.script, deprecated in torch
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


def _loss(**kw):
    return lambda q, k, v: attnext.attention(q, k, v, **kw).float().square().sum()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"causal": "bottom_right", "layout": "bshd"},
                                {"window_size": (5, 2)}], ids=["none", "causal", "bshd", "window"])
def test_func_grad_equals_autograd(cpu_unit, dtype, kw):
    """torch.func.grad runs the same kernels as loss.backward(): the same gradients, bit for bit."""
    q, k, v = make_qkv(2, 4, 2, 23, 37, 16, dtype, layout=kw.get("layout", "bhsd"))
    got = torch.func.grad(_loss(**kw), argnums=(0, 1, 2))(q, k, v)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(_loss(**kw)(*leaves), leaves)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_vmap_of_grad_equals_per_sample_grads(cpu_unit):
    """Per-sample gradients over a batch of queries: vmap runs the ops once per entry (torch warns that it
    falls back to a loop), each as autograd would."""
    q, k, v = make_qkv(1, 2, 2, 9, 13, 8)
    qs = torch.randn(3, *q.shape)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop")
        got = torch.func.vmap(torch.func.grad(_loss()), in_dims=(0, None, None))(qs, k, v)
    for i in range(3):
        leaf = qs[i].clone().requires_grad_()
        assert torch.equal(got[i], torch.autograd.grad(_loss()(leaf, k, v), leaf)[0])


def test_grad_of_vmap_equals_per_sample_grads(cpu_unit):
    """Inside a vmap under torch.func.grad the inputs do not show requires_grad: the grad transform on the
    stack is what picks the differentiable path."""
    q, k, v = make_qkv(1, 2, 2, 9, 13, 8)
    qs = torch.randn(3, *q.shape)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop")
        got = torch.func.grad(lambda qs: torch.func.vmap(_loss(), in_dims=(0, None, None))(qs, k, v).sum())(qs)
    for i in range(3):
        leaf = qs[i].clone().requires_grad_()
        assert torch.equal(got[i], torch.autograd.grad(_loss()(leaf, k, v), leaf)[0])


def test_functionalize_takes_the_inference_op(cpu_unit):
    q, k, v = make_qkv(1, 2, 2, 9, 13, 8)
    assert torch.equal(torch.func.functionalize(attnext.attention)(q, k, v), attnext.attention(q, k, v))


def test_jacrev_matches_reference(cpu_unit):
    q, k, v = make_qkv(1, 2, 1, 3, 5, 4)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop")
        got = torch.func.jacrev(attnext.attention, argnums=(0, 1, 2))(q, k, v)
    want = torch.func.jacrev(lambda q, k, v: attention_reference(q, k, v)[0], argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_forward_ad_raises(cpu_unit):
    """A tangent on q, k or v raises (before, the inference path dropped it: the tangent of out came back
    None); plain tensors inside a dual level go through."""
    q, k, v = make_qkv(1, 2, 2, 5, 7, 8)
    with fwAD.dual_level():
        for i in range(3):
            inputs = [q, k, v]
            inputs[i] = fwAD.make_dual(inputs[i], torch.ones_like(inputs[i]))
            with pytest.raises(NotImplementedError, match=FORWARD_AD):
                attnext.attention(*inputs)
        plain = attnext.attention(q, k, v)
    assert torch.equal(plain, attnext.attention(q, k, v))
    with pytest.raises(NotImplementedError, match=FORWARD_AD):
        torch.func.jvp(lambda q: attnext.attention(q, k, v), (q,), (torch.ones_like(q),))
    with pytest.raises(NotImplementedError, match=FORWARD_AD):
        torch.func.hessian(lambda q: attnext.attention(q, k, v).sum())(q)


def test_grad_of_grad_raises(cpu_unit):
    q, k, v = make_qkv(1, 2, 2, 5, 7, 8)
    with pytest.raises(RuntimeError, match=DOUBLE_BACKWARD):
        torch.func.grad(lambda q: torch.func.grad(_loss())(q, k, v).sum())(q)
