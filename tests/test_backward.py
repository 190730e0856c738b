"""Gradients beyond the forward files' checks: through lse, of common losses, bitwise determinism and
agreement across thread counts."""

import pytest
import torch

import attnext
from helpers import DTYPES, GRAD_FLOOR, assert_close_by_rule, check_attention, floor_for, make_qkv, \
    references


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), ("top_left", (-1, -1)), ("bottom_right", (-1, -1)),
                                           (False, (6, 3))])
def test_lse_gradient(cpu_unit, dtype, causal, window):
    """A loss of out and lse together: dlse flows into dq and dk."""
    q, k, v = make_qkv(2, 4, 2, 37, 53, 32, dtype)
    check_attention(q, k, v, causal=causal, window_size=window, dlse=True)


# The backward's key tiles depend on the mask and the length (backward_impl.h, FmaBackward::tiling): 256
# keys without a mask, 64 under one up to Sq = 2048 and 128 beyond; these cases end ragged on each.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sq,sk,causal", [(2049, 2100, "bottom_right"), (2100, 2049, "top_left"),
                                          (600, 1037, False)])
def test_key_tile_lengths(cpu_unit, dtype, sq, sk, causal):
    q, k, v = make_qkv(1, 2, 1, sq, sk, 40, dtype)
    check_attention(q, k, v, causal=causal, dlse=True)


def test_lse_only_loss(cpu_unit):
    """A loss of lse alone (out unused): the backward gets no grad_out; dv is 0."""
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 1, 29, 41, 16))
    _, lse = attnext.attention(q, k, v, return_lse=True, causal="bottom_right")
    dlse = torch.randn_like(lse)
    dq, dk, dv = torch.autograd.grad((lse * dlse).sum(), (q, k, v))
    hi, lo = references(q, k, v, torch.zeros_like(q), dlse, causal="bottom_right")
    floor = floor_for([hi["dq"], hi["dk"]], GRAD_FLOOR)
    assert_close_by_rule(dq, hi["dq"], lo["dq"], 3, floor, "dq")
    assert_close_by_rule(dk, hi["dk"], lo["dk"], 3, floor, "dk")
    assert torch.all(dv == 0)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_sum_loss(cpu_unit, layout):
    """out.sum().backward() hands the backward an expanded grad_out (all strides 0)."""
    q, k, v = make_qkv(2, 4, 2, 23, 31, 24, layout=layout)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    attnext.attention(*leaves, layout=layout, causal="top_left").sum().backward()
    hi, lo = references(q, k, v, torch.ones_like(q), layout=layout, causal="top_left")
    floor = floor_for([hi["dq"], hi["dk"], hi["dv"]], GRAD_FLOOR)
    for leaf, name in zip(leaves, ("dq", "dk", "dv")):
        assert_close_by_rule(leaf.grad, hi[name], lo[name], 3, floor, name)


def test_gradients_accumulate_into_leaves(cpu_unit):
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 1, 13, 17, 16))
    attnext.attention(q, k, v).pow(2).sum().backward()
    first = [t.grad.clone() for t in (q, k, v)]
    attnext.attention(q, k, v).pow(2).sum().backward()
    for t, g in zip((q, k, v), first):
        torch.testing.assert_close(t.grad, 2 * g, rtol=0, atol=0)


def _grads(q, k, v, dout, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = attnext.attention(*leaves, return_lse=True, **kw)
    loss = (out * dout).sum() + torch.where(torch.isfinite(lse), lse, 0).sum()
    return (out, lse, *torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_is_bitwise_repeatable(cpu_unit, dtype, deterministic):
    """One (batch, kv head) pair and many key tiles: the backward splits the keys over tasks, each with its
    own dQ accumulator; the reduction must not depend on scheduling."""
    q, k, v = make_qkv(1, 4, 1, 150, 300, 64, dtype)
    dout = torch.randn_like(q)
    first = _grads(q, k, v, dout, causal="bottom_right", deterministic=deterministic)
    for _ in range(2):
        again = _grads(q, k, v, dout, causal="bottom_right", deterministic=deterministic)
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), first, again):
            assert torch.equal(a, b), f"{name} differs between two identical runs"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_threads_agree(cpu_unit, dtype, restore_threads):
    """1 and 2 threads (different work splits of the backward) both meet the rule against the reference."""
    q, k, v = make_qkv(1, 4, 2, 130, 200, 64, dtype)
    for n in (1, 2):
        torch.set_num_threads(n)
        assert torch.get_num_threads() == n
        check_attention(q, k, v, causal="top_left", dlse=True, what=f"threads={n}")


def test_no_grad_needed_for_some_inputs(cpu_unit):
    """Only q requires grad: autograd asks for dq alone."""
    q, k, v = make_qkv(1, 2, 2, 11, 19, 16)
    q.requires_grad_()
    dq, = torch.autograd.grad(attnext.attention(q, k, v).sum(), (q,))
    hi, lo = references(q, k, v, torch.ones_like(q))
    assert_close_by_rule(dq, hi["dq"], lo["dq"], 3, floor_for([hi["dq"], hi["dk"], hi["dv"]], GRAD_FLOOR), "dq")


def test_nonfinite_dlse_on_rows_without_keys(cpu_unit):
    """A row that sees no key has P = 0: a NaN or inf gradient of its lse (-inf) must not reach any other
    gradient, e.g. through Delta into dS = P (dP - Delta) of the whole key tile."""
    q, k, v = make_qkv(1, 2, 2, 40, 24, 32, torch.float32)
    out, lse = torch.ops.attnext.fwd(q, k, v, 0.25, 2, -1, -1, False)  # bottom-right: rows 0..15 see nothing
    dlse = torch.randn_like(lse)
    dlse[:, :, :16] = float("nan")
    dlse[:, :, 0] = float("inf")
    dq, dk, dv = torch.ops.attnext.bwd(torch.randn_like(out), q, k, v, out, lse, dlse, 0.25, 2, -1, -1, False, True)
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
    assert torch.all(dq[:, :, :16] == 0)


def test_deterministic_algorithms_ask_for_the_deterministic_backward(restore_deterministic):
    """torch.use_deterministic_algorithms(True) gives attnext::bwd deterministic=True (the CUDA kernels then
    take the ordered dQ pass; the CPU backward is deterministic either way)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    flags = []

    class BwdFlags(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.attnext.bwd.default:
                flags.append(args[-1])
            return func(*args, **(kwargs or {}))

    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 2, 9, 11, 16))
    for enabled in (False, True):
        torch.use_deterministic_algorithms(enabled)
        with BwdFlags():
            attnext.attention(q, k, v).sum().backward()
    assert flags == [False, True]
