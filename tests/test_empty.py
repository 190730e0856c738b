"""Empty tensors: batch 0, heads 0, Sq 0, Sk 0. Correctly shaped results, forward and backward; with Sk 0
every row sees no key (out 0, lse -inf, gradients 0)."""

import pytest
import torch

import attnext
from attnext.reference import attention_reference
from helpers import DTYPES

# (q shape, k/v shape) in bhsd
EMPTY = {
    "batch0": ((0, 4, 7, 16), (0, 2, 9, 16)),
    "heads0": ((2, 0, 7, 16), (2, 0, 9, 16)),
    "sq0": ((2, 4, 0, 16), (2, 2, 9, 16)),
    "sk0": ((2, 4, 7, 16), (2, 2, 0, 16)),
    "sq0_sk0": ((2, 4, 0, 16), (2, 2, 0, 16)),
}
CAUSAL = [False, "top_left", "bottom_right"]


def _inputs(case, dtype, layout="bhsd"):
    qs, ks = EMPTY[case]
    if layout == "bshd":
        qs, ks = (qs[0], qs[2], qs[1], qs[3]), (ks[0], ks[2], ks[1], ks[3])
    return [torch.randn(s).to(dtype).requires_grad_() for s in (qs, ks, ks)]


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("case", EMPTY)
def test_empty_forward(cpu_unit, case, causal, layout):
    q, k, v = _inputs(case, torch.float32, layout)
    out, lse = attnext.attention(q, k, v, causal=causal, layout=layout, return_lse=True)
    b, h, s = (q.shape[0], q.shape[2], q.shape[1]) if layout == "bshd" else q.shape[:3]
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (b, h, s) and lse.dtype == torch.float32
    if case == "sk0":
        assert torch.all(out == 0)
        assert torch.all(lse == float("-inf"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("case", EMPTY)
def test_empty_backward(cpu_unit, case, causal, dtype):
    """An explicit grad_out and a grad of lse: gradients shaped like the inputs; dk, dv zero when no query
    reads them, dq zero when there is no key."""
    q, k, v = _inputs(case, dtype)
    out, lse = attnext.attention(q, k, v, causal=causal, return_lse=True)
    loss = (out * torch.randn_like(out)).sum() + (torch.where(torch.isfinite(lse), lse, 0)).sum()
    dq, dk, dv = torch.autograd.grad(loss, (q, k, v))
    for g, t in zip((dq, dk, dv), (q, k, v)):
        assert g.shape == t.shape and g.dtype == t.dtype
        assert torch.all(g == 0)


@pytest.mark.parametrize("case", EMPTY)
def test_empty_sum_backward(case):
    """out.sum().backward(): for an empty out, autograd's grad_out is an expanded empty tensor whose strides are
    all 0 (and contiguous() keeps them, an empty tensor counting as contiguous)."""
    q, k, v = _inputs(case, torch.float32)
    attnext.attention(q, k, v).sum().backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and torch.all(t.grad == 0)


def test_empty_sdpa_sum_backward():
    q, k, v = _inputs("batch0", torch.float32)
    attnext.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
    assert q.grad.shape == q.shape


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sk0_with_grad_out(cpu_unit, dtype):
    """Sk = 0, Sq > 0: out is 0 and does not depend on q; dq is exactly 0, never NaN."""
    q, k, v = _inputs("sk0", dtype)
    out = attnext.attention(q, k, v, causal="bottom_right")
    dq, = torch.autograd.grad(out, (q,), torch.randn_like(out))
    assert torch.all(dq == 0)


def test_empty_flash_attn_func(cpu_unit):
    q, k, v = _inputs("sk0", torch.float32, layout="bshd")
    out, lse, probs = attnext.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert out.shape == q.shape and torch.all(out == 0)
    assert lse.shape == (2, 4, 7) and torch.all(lse == float("-inf")) and probs is None


def test_meta_tensors():
    """Shapes only (as torch.compile traces them): the fake kernel answers for meta inputs."""
    q, k = torch.empty(2, 9, 4, 8, device="meta"), torch.empty(2, 7, 2, 8, device="meta")
    out, lse = attnext.attention(q, k, k, layout="bshd", causal="bottom_right", return_lse=True)
    assert out.shape == q.shape and out.device.type == "meta"
    assert lse.shape == (2, 4, 9) and lse.dtype == torch.float32


def test_reference_sk0():
    """The reference follows the same contract for Sk = 0: out 0, lse -inf."""
    q, k, v = _inputs("sk0", torch.float32)
    for upcast in (True, False):
        out, lse = attention_reference(q, k, v, causal="bottom_right", upcast=upcast)
        assert out.shape == q.shape and torch.all(out == 0)
        assert lse.shape == (2, 4, 7) and torch.all(lse == float("-inf"))
