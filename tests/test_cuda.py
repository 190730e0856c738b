"""The CUDA kernels against the float64 reference by the tolerance rule, forward and backward, on the design's
grid: odd sizes, Sq != Sk with both alignments, head dims at and between the buckets, GQA/MQA, layouts and
strided views, windows, fully masked rows, determinism, streams, CUDA graphs, opcheck and torch.compile.
Skipped when no CUDA device is visible."""

import warnings

import pytest
import torch

import attnext
from helpers import check_against_torch_sdpa, check_attention, empty_rows, make_qkv

pytestmark = pytest.mark.cuda

CUDA_DTYPES = (torch.float16, torch.bfloat16)


def cuda_qkv(*args, **kw):
    return tuple(t.cuda() for t in make_qkv(*args, **kw))


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
@pytest.mark.parametrize("sq,sk", [(1, 1), (17, 113), (113, 17), (203, 203), (1023, 1025)])
def test_sizes_and_alignments(dtype, causal, sq, sk):
    q, k, v = cuda_qkv(1, 4, 2, sq, sk, 64, dtype)
    got = check_attention(q, k, v, causal=causal, dlse=True)
    assert got["out"].device == q.device and got["lse"].device == q.device


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("d", [8, 32, 40, 64, 72, 96, 104, 128, 136, 192, 200, 256])
def test_head_dims(dtype, d):
    q, k, v = cuda_qkv(2, 2, 1, 113, 203, d, dtype)
    check_attention(q, k, v, causal="bottom_right")


@pytest.mark.parametrize("hkv", [8, 4, 2, 1])
def test_gqa(hkv):
    q, k, v = cuda_qkv(2, 8, hkv, 129, 257, 128, torch.bfloat16)
    check_attention(q, k, v, causal=True)


@pytest.mark.parametrize("window", [(8, 4), (0, 0), (-1, 16), (32, -1)])
def test_windows_bshd(window):
    q, k, v = cuda_qkv(1, 4, 4, 65, 147, 128, torch.bfloat16, layout="bshd")
    check_attention(q, k, v, layout="bshd", window_size=window)


def test_strided_views():
    """Rows of a wider tensor (seq stride 2·D) and K/V expanded along heads (head stride 0): no copies."""
    base = torch.randn(2, 4, 77, 128, device="cuda", dtype=torch.float16)
    q = base[..., :64]
    k = torch.randn(2, 1, 91, 64, device="cuda", dtype=torch.float16).expand(2, 4, 91, 64)
    v = torch.randn(2, 1, 91, 64, device="cuda", dtype=torch.float16).expand(2, 4, 91, 64)
    check_attention(q, k, v, causal="bottom_right")


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
def test_fully_masked_rows(dtype):
    """bottom_right with Sq > Sk: the first Sq - Sk rows see no key: out 0, lse -inf, zero gradients, no NaN."""
    q, k, v = cuda_qkv(1, 2, 2, 70, 30, 64, dtype)
    got = check_attention(q, k, v, causal="bottom_right")
    rows = empty_rows(70, 30, causal="bottom_right")
    assert torch.all(got["out"][:, :, rows] == 0) and torch.all(got["lse"][:, :, rows] == float("-inf"))
    assert torch.all(got["dq"][:, :, rows] == 0)
    for t in got.values():
        assert not torch.isnan(t).any()


def test_empty_keys():
    q, k, v = cuda_qkv(1, 2, 2, 5, 0, 64, torch.bfloat16)
    out, lse = attnext.attention(q, k, v, return_lse=True)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))


@pytest.mark.parametrize("causal", [False, "bottom_right"])
def test_deterministic_backward(causal):
    """deterministic=True is bitwise repeatable and agrees with the atomic path by the rule."""
    q, k, v = cuda_qkv(2, 8, 2, 300, 517, 128, torch.bfloat16)
    check_attention(q, k, v, causal=causal, deterministic=True)
    dout = torch.randn_like(q)
    runs = []
    for _ in range(3):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = attnext.attention(*leaves, causal=causal, deterministic=True)
        runs.append(torch.autograd.grad(out, leaves, dout))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_side_stream():
    """The kernels launch on the current stream, not the default one."""
    q, k, v = cuda_qkv(2, 4, 4, 257, 257, 64, torch.float16)
    expected = attnext.attention(q, k, v, causal=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = attnext.attention(q, k, v, causal=True)
    stream.synchronize()
    assert torch.equal(got, expected)


def test_cuda_graph_capture():
    """Forward and backward capture in a CUDA graph (no synchronisation inside the ops) and replay on new inputs."""
    q, k, v = (t.requires_grad_() for t in cuda_qkv(1, 4, 4, 128, 128, 64, torch.bfloat16))
    dout = torch.randn_like(q)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph
        torch.autograd.grad(attnext.attention(q, k, v, causal=True), (q, k, v), dout)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attnext.attention(q, k, v, causal=True)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    with torch.no_grad():
        for t in (q, k, v):
            t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    expected = attnext.attention(*leaves, causal=True)
    assert torch.equal(out, expected)
    for a, b in zip(grads, torch.autograd.grad(expected, leaves, dout)):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)  # dQ's atomics may add in another order


def test_float32_error():
    q, k, v = cuda_qkv(1, 2, 2, 16, 16, 64, torch.float32)
    with pytest.raises(RuntimeError, match=r"attnext.attention: dtype float32 is not supported on CUDA "
                                           r"\(supported: float16, bfloat16"):
        attnext.attention(q, k, v)


@pytest.mark.parametrize("d", [60, 264])
def test_head_dim_error(d):
    q, k, v = cuda_qkv(1, 2, 2, 16, 16, d, torch.bfloat16)
    with pytest.raises(RuntimeError, match=rf"attnext.attention: head_dim {d} is not supported on CUDA "
                                           r"\(supported: 8..256, multiple of 8\)"):
        attnext.attention(q, k, v)


def test_misaligned_error():
    base = torch.randn(1, 2, 16, 65, device="cuda", dtype=torch.float16)
    q = base[..., 1:]  # seq stride 65, data pointer off by one element
    with pytest.raises(RuntimeError, match=r"attnext.attention: q must have a 16-byte aligned data pointer"):
        attnext.attention(q, q, q)


def test_sdpa_dropin_and_fallbacks(monkeypatch):
    monkeypatch.setattr(attnext.api, "_warned", set())  # the fallback warns once per reason and process
    q, k, v = cuda_qkv(2, 8, 2, 33, 47, 64, torch.bfloat16)
    check_against_torch_sdpa(q, k, v, is_causal=True, enable_gqa=True)
    q32, k32, v32 = (t.float() for t in (q, k, v))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = attnext.scaled_dot_product_attention(q32, k32, v32, is_causal=True, enable_gqa=True)
    expected = torch.nn.functional.scaled_dot_product_attention(q32, k32, v32, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, expected)
    assert any("float32 on CUDA" in str(w.message) for w in caught)


def test_opcheck():
    q, k, v = (t.requires_grad_() for t in cuda_qkv(1, 4, 2, 37, 53, 64, torch.bfloat16))
    args = (0.125, 2, -1, -1, False)
    torch.library.opcheck(torch.ops.attnext.fwd, (q, k, v, *args, False))
    out, lse = torch.ops.attnext.fwd(q.detach(), k.detach(), v.detach(), *args)
    torch.library.opcheck(torch.ops.attnext.bwd, (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out,
                                                  lse, torch.randn_like(lse), *args, True))


def test_compile_fullgraph():
    q, k, v = cuda_qkv(2, 4, 2, 65, 80, 128, torch.float16)
    fn = torch.compile(lambda a, b, c: attnext.attention(a, b, c, causal="bottom_right"), fullgraph=True)
    torch.testing.assert_close(fn(q, k, v), attnext.attention(q, k, v, causal="bottom_right"), rtol=0, atol=0)


def test_nonfinite_dlse_on_rows_without_keys():
    """Rows without keys share a query block with rows that have some: a NaN/inf gradient of their lse (-inf)
    must not turn dS = P (dP - Delta) of the whole tile into NaN."""
    q, k, v = cuda_qkv(1, 2, 2, 40, 24, 64, torch.bfloat16)
    for deterministic in (False, True):
        out, lse = torch.ops.attnext.fwd(q, k, v, 0.125, 2, -1, -1, False)  # bottom-right: rows 0..15 see nothing
        dlse = torch.randn_like(lse)
        dlse[:, :, :16] = float("nan")
        dlse[:, :, 0] = float("inf")
        dq, dk, dv = torch.ops.attnext.bwd(torch.randn_like(out), q, k, v, out, lse, dlse, 0.125, 2, -1, -1, False,
                                           deterministic)
        for g in (dq, dk, dv):
            assert torch.isfinite(g).all()
        assert torch.all(dq[:, :, :16] == 0)
