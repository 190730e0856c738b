"""Layouts and strides: bshd views, expanded K/V (stride 0), sliced tensors with gaps, non-contiguous
grad_out. The kernels take strides; results must match the reference on the same views."""

import pytest
import torch

import attnext
from helpers import DTYPES, check_attention, make_qkv


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, "bottom_right"])
def test_bshd_contiguous(cpu_unit, dtype, causal):
    q, k, v = make_qkv(2, 4, 2, 37, 29, 32, dtype, layout="bshd")
    got = check_attention(q, k, v, layout="bshd", causal=causal, dlse=True)
    assert got["out"].shape == (2, 37, 4, 32)
    assert got["lse"].shape == (2, 4, 37)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bshd_view_of_bhsd(cpu_unit, dtype):
    """A contiguous (B, H, S, D) tensor transposed to (B, S, H, D) and read with layout bshd."""
    q, k, v = (t.transpose(1, 2) for t in make_qkv(2, 4, 1, 45, 33, 24, dtype))
    assert not q.is_contiguous()
    got = check_attention(q, k, v, layout="bshd", causal="top_left")
    assert got["out"].shape == q.shape == (2, 45, 4, 24)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bhsd_view_of_bshd(cpu_unit, dtype):
    """A contiguous (B, S, H, D) tensor transposed to (B, H, S, D) and read with layout bhsd."""
    q, k, v = (t.transpose(1, 2) for t in make_qkv(2, 4, 2, 45, 33, 24, dtype, layout="bshd"))
    assert not q.is_contiguous()
    got = check_attention(q, k, v, layout="bhsd", causal="bottom_right")
    assert got["out"].shape == q.shape == (2, 4, 45, 24)


def test_layouts_agree(cpu_unit):
    """The same data read in both layouts gives the same result, transposed."""
    q, k, v = make_qkv(2, 4, 2, 21, 30, 16)
    out, lse = attnext.attention(q, k, v, causal="bottom_right", return_lse=True)
    out_t, lse_t = attnext.attention(*(t.transpose(1, 2) for t in (q, k, v)), causal="bottom_right",
                                     layout="bshd", return_lse=True)
    assert out_t.shape == (2, 21, 4, 16)
    torch.testing.assert_close(out_t.transpose(1, 2), out, rtol=0, atol=1e-6)
    torch.testing.assert_close(lse_t, lse, rtol=0, atol=1e-6)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_expanded_kv(cpu_unit, dtype, layout):
    """K/V expanded along heads (stride 0), as users write MQA without copies; gradients sum into the base."""
    b, hq, hkv, sq, sk, d = 2, 4, 4, 19, 27, 32
    q, k1, v1 = make_qkv(b, hq, 1, sq, sk, d, dtype, layout)
    head_axis = 1 if layout == "bhsd" else 2
    shape = list(k1.shape)
    shape[head_axis] = hkv
    k, v = k1.expand(shape), v1.expand(shape)
    assert k.stride(head_axis) == 0
    check_attention(q, k, v, layout=layout, causal="bottom_right")

    k1g, v1g = k1.clone().requires_grad_(), v1.clone().requires_grad_()
    out = attnext.attention(q, k1g.expand(shape), v1g.expand(shape), layout=layout)
    ref = attnext.attention(q, k1, v1, layout=layout)  # the same attention as MQA with one kv head
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    out.sum().backward()
    assert k1g.grad.shape == k1.shape and torch.isfinite(k1g.grad).all()


def test_expanded_batch(cpu_unit):
    """K/V shared by every batch entry: stride 0 along the batch."""
    q, k1, v1 = make_qkv(1, 4, 2, 17, 23, 16)
    q = torch.randn(3, 4, 17, 16)
    k, v = k1.expand(3, -1, -1, -1), v1.expand(3, -1, -1, -1)
    check_attention(q, k, v, causal="top_left")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sliced_with_gaps(cpu_unit, dtype):
    """Every other sequence position, a head dim cut out of a wider one, a sub-range of heads and batches."""
    big = torch.randn(3, 6, 80, 48).to(dtype)
    q = big[::2, 1:5, ::2, 8:40]        # (2, 4, 40, 32): gaps in every dim but the last
    k = big[1:, :2, 1:61:3, :32]        # (2, 2, 20, 32)
    v = torch.randn(2, 20, 5, 40).to(dtype)[:, :, 1:3, 4:36].transpose(1, 2)
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    assert not any(t.is_contiguous() for t in (q, k, v))
    check_attention(q, k, v, causal="bottom_right", dlse=True)


def test_sliced_bshd(cpu_unit):
    big = torch.randn(2, 50, 8, 40)
    q, k, v = big[:, ::2, :4, :16], big[:, 1:49:3, 4:6, 16:32], big[:, 2:50:3, 6:8, 24:40]
    got = check_attention(q, k, v, layout="bshd", window_size=(4, 2))
    assert got["out"].shape == (2, 25, 4, 16)


def test_size_one_head_dim_any_stride(cpu_unit):
    """D = 1: the last dim's stride does not matter."""
    base = torch.randn(2, 2, 13, 4)
    q = base[..., 1:2]
    k = torch.randn(2, 2, 4, 15).transpose(-1, -2)[..., :1]
    v = torch.randn(2, 2, 15, 1)
    check_attention(q, k, v)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_non_contiguous_grad_out(cpu_unit, layout):
    """A grad_out transposed in memory (last dim not contiguous) and one that is a bshd/bhsd view."""
    q, k, v = make_qkv(1, 2, 2, 20, 24, 16, layout=layout)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attnext.attention(*leaves, layout=layout)
    g = torch.randn_like(out)
    g_strided = g.transpose(-1, -2).contiguous().transpose(-1, -2)
    g_view = g.transpose(1, 2).contiguous().transpose(1, 2)
    assert g_strided.stride(-1) != 1 and not g_view.is_contiguous()
    want = torch.autograd.grad(out, leaves, g, retain_graph=True)
    for grad_out in (g_strided, g_view):
        got = torch.autograd.grad(out, leaves, grad_out, retain_graph=True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_inputs_not_modified(cpu_unit):
    q, k, v = make_qkv(1, 2, 1, 9, 12, 8, layout="bshd")
    copies = [t.clone() for t in (q, k, v)]
    leaves = [t.requires_grad_() for t in (q, k, v)]
    attnext.attention(*leaves, layout="bshd").sum().backward()
    for t, c in zip(leaves, copies):
        assert torch.equal(t.detach(), c)
