"""attnext.attention against the reference by FlashAttention's rule, on every runnable CPU vector unit:
odd sizes, both causal alignments, fully masked rows, GQA/MQA, head dims, dtypes, windows and scale.
Each case checks out, lse and dq/dk/dv (see helpers.check_attention)."""

import itertools
import math

import pytest
import torch

import attnext
from helpers import DTYPES, check_attention, empty_rows, make_qkv

ODD = (1, 17, 113, 203)
MASKS = (False, "top_left", "bottom_right")


@pytest.mark.parametrize("causal", MASKS)
@pytest.mark.parametrize("sk", ODD)
@pytest.mark.parametrize("sq", ODD)
def test_odd_sizes(cpu_unit, sq, sk, causal):
    q, k, v = make_qkv(1, 2, 2, sq, sk, 40)
    check_attention(q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", MASKS)
@pytest.mark.parametrize("sq,sk", [(1023, 1025), (1025, 1023), (1025, 1025), (1, 1025), (17, 1023), (1025, 17),
                                   (203, 1025)])
def test_long_sequences(cpu_unit, sq, sk, causal, dtype):
    q, k, v = make_qkv(1, 2, 1, sq, sk, 64, dtype)
    check_attention(q, k, v, causal=causal)


# K and V of a head at 8 MiB or more (times the threads): the forward shares each key tile among a run of
# query tiles (tiling.h, forward_query_group); the runs end ragged at 300, 203 and 517 rows.
@pytest.mark.parametrize("dtype,sq,d,threads", [
    (torch.float32, 300, 128, 1),
    (torch.float16, 203, 256, 1),
    (torch.bfloat16, 517, 128, 2),
], ids=str)
def test_long_keys_shared_by_query_tiles(cpu_unit, restore_threads, dtype, sq, d, threads):
    torch.set_num_threads(threads)
    q, k, v = make_qkv(1, 2, 1, sq, 8192, d, dtype)
    check_attention(q, k, v, what=f"{threads} threads")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sq,sk,causal,window", [
    (1025, 1023, False, (100, 50)),
    (1023, 1025, "bottom_right", (200, -1)),
    (1025, 113, False, (-1, 0)),             # rows 0..911 see no key
    (113, 1025, "top_left", (30, 0)),
])
def test_long_windows(cpu_unit, dtype, sq, sk, causal, window):
    q, k, v = make_qkv(1, 2, 2, sq, sk, 32, dtype)
    check_attention(q, k, v, causal=causal, window_size=window, dlse=True)


# (Sq, Sk, causal, window); the comments say which keys row i sees and which rows see none
MASKED = [
    (203, 17, "bottom_right", (-1, -1)),  # diagonal at key i - 186: rows 0..185
    (40, 7, "bottom_right", (2, -1)),     # keys i - 35 .. i - 33: rows 0..32
    (40, 7, "top_left", (2, -1)),         # keys i - 2 .. i: rows 9..39 (the bottom rows)
    (113, 17, False, (3, 0)),             # keys i - 99 .. i - 96: rows 0..95
    (113, 17, False, (-1, 2)),            # keys .. i - 94: rows 0..93
    (17, 113, False, (0, 0)),             # one key per row, none masked
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sq,sk,causal,window", MASKED)
def test_fully_masked_rows(cpu_unit, dtype, sq, sk, causal, window):
    """Rows without a visible key: out exactly 0, lse -inf, dq exactly 0, and no NaN anywhere, also when
    the loss reads lse."""
    q, k, v = make_qkv(1, 4, 2, sq, sk, 32, dtype)
    got = check_attention(q, k, v, causal=causal, window_size=window, dlse=True)
    rows = empty_rows(sq, sk, causal, window)
    assert torch.all(got["out"][:, :, rows] == 0)
    assert torch.all(got["lse"][:, :, rows] == float("-inf"))
    assert torch.all(got["lse"][:, :, ~rows] > float("-inf"))
    assert torch.all(got["dq"][:, :, rows] == 0)
    for name in ("out", "dq", "dk", "dv"):
        assert torch.isfinite(got[name]).all(), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (8, 2), (8, 1), (16, 2), (5, 1)],
                         ids=["ratio1", "ratio2", "ratio4", "ratio8-mqa", "ratio8", "mqa5"])
def test_gqa(cpu_unit, dtype, hq, hkv):
    q, k, v = make_qkv(2, hq, hkv, 33, 47, 32, dtype)
    check_attention(q, k, v, causal="bottom_right")


HEAD_DIMS = (1, 3, 8, 16, 32, 40, 64, 72, 96, 128, 160, 192, 256, 257, 320, 384, 512)


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_head_dims(cpu_unit, d):
    # Past D = 256 key tiles hold 32 keys; 5 keys make them 16 (key_tile), the shortest tile there is.
    sizes = [(33, 70)] if d <= 128 else [(9, 37)] if d <= 256 else [(9, 37), (20, 5)]
    for dtype, (sq, sk) in itertools.product(DTYPES, sizes):
        q, k, v = make_qkv(1, 2, 1, sq, sk, d, dtype)
        check_attention(q, k, v, causal="bottom_right", what=f"d={d} Sq={sq} Sk={sk}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,hq,hkv,sq,sk,d,causal", [
    (2, 3, 3, 65, 64, 64, False),
    (1, 4, 2, 64, 129, 128, "top_left"),
    (3, 2, 1, 130, 66, 96, "bottom_right"),
    (1, 1, 1, 1, 1, 16, "bottom_right"),
])
def test_dtypes(cpu_unit, dtype, b, hq, hkv, sq, sk, d, causal):
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype)
    got = check_attention(q, k, v, causal=causal, dlse=True)
    assert got["out"].dtype == dtype and got["lse"].dtype == torch.float32
    assert all(got[n].dtype == dtype for n in ("dq", "dk", "dv"))


WINDOWS = [(0, 0), (1, 0), (0, 1), (3, 2), (5, -1), (-1, 3), (16, 16), (100, 0), (0, 100)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", WINDOWS, ids=str)
@pytest.mark.parametrize("sq,sk", [(70, 70), (37, 90), (90, 37)])
def test_windows(cpu_unit, sq, sk, window, dtype):
    q, k, v = make_qkv(1, 2, 1, sq, sk, 24, dtype)
    check_attention(q, k, v, window_size=window)


@pytest.mark.parametrize("causal", ["top_left", "bottom_right"])
@pytest.mark.parametrize("window", [(0, 0), (4, 0), (4, -1), (64, -1)], ids=str)
@pytest.mark.parametrize("sq,sk", [(70, 70), (37, 90), (90, 37)])
def test_causal_with_window(cpu_unit, sq, sk, causal, window):
    """causal with a left window; a right bound of 0 or -1 is the causal one."""
    q, k, v = make_qkv(1, 2, 2, sq, sk, 24)
    check_attention(q, k, v, causal=causal, window_size=window)


def test_causal_window_right_bound_is_causal(cpu_unit):
    q, k, v = make_qkv(1, 2, 1, 20, 31, 16)
    a = check_attention(q, k, v, causal="bottom_right", window_size=(3, -1), grads=False)
    b = check_attention(q, k, v, causal="bottom_right", window_size=(3, 0), grads=False)
    c = check_attention(q, k, v, window_size=(3, 0), grads=False)
    assert torch.equal(a["out"], b["out"]) and torch.equal(a["out"], c["out"])


@pytest.mark.parametrize("scale", [0.01, 0.3, 1.0, 4.0])
def test_scale(cpu_unit, scale):
    q, k, v = make_qkv(2, 2, 1, 45, 61, 32)
    check_attention(q, k, v, scale=scale, causal="top_left")


def test_default_scale_is_inverse_sqrt_head_dim(cpu_unit):
    q, k, v = make_qkv(1, 2, 2, 9, 11, 36)
    assert torch.equal(attnext.attention(q, k, v), attnext.attention(q, k, v, scale=1 / 6))


def test_causal_true_is_top_left(cpu_unit):
    q, k, v = make_qkv(1, 2, 2, 9, 17, 16)
    assert torch.equal(attnext.attention(q, k, v, causal=True), attnext.attention(q, k, v, causal="top_left"))
    assert not torch.equal(attnext.attention(q, k, v, causal=True),
                           attnext.attention(q, k, v, causal="bottom_right"))


def test_large_scores_are_stable(cpu_unit):
    """Scores in the hundreds: the online softmax must neither overflow nor lose the small terms."""
    q, k, v = make_qkv(1, 2, 1, 50, 70, 64)
    got = check_attention(q * 8, k * 8, v, causal="bottom_right", dlse=True)
    assert torch.isfinite(got["lse"]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_largest_score_sets_the_maximum_wherever_it_lies(cpu_unit, dtype):
    """One key scores ~290 (base 2) above all others, at every position of a key tile's micro-kernel rows
    and of a partial last tile: if the running maximum missed it, 2^(s - m) would overflow to inf."""
    sq, sk, d = 37, 2 * 256 + 13, 32
    q = torch.ones(1, 1, sq, d).to(dtype)
    for j in list(range(0, 17)) + [255, 256, 263, 264, 511, 512, 519] + list(range(sk - 6, sk)):
        k = (0.1 * torch.randn(1, 1, sk, d)).to(dtype)
        k[:, :, j] = 200 / math.sqrt(d)
        v = torch.randn(1, 1, sk, d).to(dtype)
        out, lse = attnext.attention(q, k, v, return_lse=True)
        assert torch.isfinite(out).all() and torch.isfinite(lse).all(), f"key {j}"
        torch.testing.assert_close(out, v[:, :, j:j + 1].expand_as(out), rtol=0, atol=0, msg=f"key {j}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sq,hq,hkv", [(1, 1, 1), (4, 16, 4), (300, 2, 2)], ids=["decode", "decode16", "prefill"])
def test_equal_scores_give_the_exact_mean(cpu_unit, dtype, sq, hq, hkv):
    """Equal scores over 4096 keys, V = +1 on the first half and -1 on the second: every P is 2^0 = 1 and
    the running maximum never moves, so no tile may rescale acc or l (a rescale by a factor a rounding
    away from 1 weighs early keys against late ones) and the sums are exact: the output is exactly 0."""
    sk, d = 4096, 64
    q = torch.zeros(1, hq, sq, d, dtype=dtype)
    k = torch.randn(1, hkv, sk, d).to(dtype)
    v = torch.ones(1, hkv, sk, d, dtype=dtype)
    v[:, :, sk // 2:] = -1
    out, lse = attnext.attention(q, k, v, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)), f"max |out| {out.abs().max().item():.3g}"
    assert torch.allclose(lse, torch.full_like(lse, math.log(sk)))
