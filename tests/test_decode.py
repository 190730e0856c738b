"""Decode-shaped problems: few query rows per KV head (Sq x GQA group <= 16), which the CPU forward serves
with the rows of a group as lanes and the keys split over tasks, merged by LSE. Shapes on both sides of
that boundary, masks that leave whole key splits (or rows) without a visible key, and thread counts that
change the split."""

import pytest
import torch

import attnext
from helpers import DTYPES, check_attention, empty_rows, make_qkv


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sq,group", [(1, 1), (1, 8), (2, 8), (1, 16), (3, 5), (16, 1), (17, 1), (5, 4)],
                         ids=lambda x: str(x))
def test_decode_shapes(cpu_unit, dtype, sq, group):
    q, k, v = make_qkv(1, 2 * group, 2, sq, 1025, 64, dtype)
    check_attention(q, k, v, causal="bottom_right", dlse=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sq,sk,causal,window", [
    (4, 1025, False, (10, 0)),            # a few keys at the end: most key splits see nothing
    (4, 1025, False, (0, -1)),            # the last few keys
    (8, 600, "top_left", (-1, -1)),       # the first few keys only
    (6, 2, "bottom_right", (-1, -1)),     # rows 0..3 see no key
    (3, 300, "bottom_right", (40, -1)),
    (2, 129, False, (-1, -1)),
])
def test_decode_masks(cpu_unit, dtype, sq, sk, causal, window):
    q, k, v = make_qkv(2, 8, 1, sq, sk, 32, dtype)
    got = check_attention(q, k, v, causal=causal, window_size=window, dlse=True)
    rows = empty_rows(sq, sk, causal, window)
    assert torch.all(got["out"][:, :, rows] == 0) and torch.all(got["lse"][:, :, rows] == float("-inf"))


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_decode_threads(cpu_unit, layout, restore_threads):
    """The key split depends on the thread count; every count meets the rule."""
    q, k, v = make_qkv(1, 4, 1, 2, 700, 128, torch.bfloat16, layout)
    for n in (1, 2):
        torch.set_num_threads(n)
        check_attention(q, k, v, layout=layout, causal="bottom_right", what=f"threads={n}")


def test_decode_strided(cpu_unit):
    """A KV cache read through a slice (the filled part of a longer buffer), queries as a bshd view."""
    cache_k, cache_v = torch.randn(2, 4, 2048, 64), torch.randn(2, 4, 2048, 64)
    k, v = cache_k[:, :, :777], cache_v[:, :, :777]
    q = torch.randn(2, 1, 8, 64)  # bshd, one new token, 8 query heads over 4 kv heads
    check_attention(q, k.transpose(1, 2), v.transpose(1, 2), layout="bshd", causal="bottom_right")


def test_decode_is_bitwise_repeatable(cpu_unit):
    """The split merge runs in a fixed order: the same call twice gives the same bits."""
    q, k, v = make_qkv(1, 8, 1, 2, 1500, 64, torch.float16)
    first = attnext.attention(q, k, v, causal="bottom_right", return_lse=True)
    for _ in range(3):
        again = attnext.attention(q, k, v, causal="bottom_right", return_lse=True)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sq,group", [(1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (7, 1), (3, 2), (1, 6), (1, 4), (2, 4),
                                      (3, 4), (4, 4), (1, 8), (2, 8)], ids=lambda x: str(x))
@pytest.mark.parametrize("sk,d", [(1, 128), (37, 128), (1000, 128), (515, 72)], ids=lambda x: str(x))
def test_decode_few_rows(cpu_unit, dtype, sq, group, sk, d):
    """1 to 16 rows per KV head (Sq x GQA group): every layout of the scores (1, 2 or 4 lanes per key, rows
    as the lanes of an 8-lane vector (5-8 rows on AVX-512) or of a full one), key counts that end in a
    partial vector of keys and a partial tile, and a head dim that is not a multiple of 16 (rows packed
    before use)."""
    q, k, v = make_qkv(1, 2 * group, 2, sq, sk, d, dtype)
    check_attention(q, k, v, grads=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("sq,sk,causal,window", [
    (1, 1025, False, (10, 0)),
    (3, 1025, False, (0, -1)),
    (4, 600, "top_left", (-1, -1)),
    (4, 2, "bottom_right", (-1, -1)),
    (3, 300, "bottom_right", (40, -1)),
    (2, 129, False, (-1, -1)),
])
def test_decode_masks_few_rows(cpu_unit, dtype, group, sq, sk, causal, window):
    """The masks of test_decode_masks with one to sixteen rows per KV head (several keys per vector, rows as
    lanes of an 8-lane or a full vector)."""
    q, k, v = make_qkv(2, 2 * group, 2, sq, sk, 32, dtype)
    got = check_attention(q, k, v, grads=False, causal=causal, window_size=window, dlse=True)
    rows = empty_rows(sq, sk, causal, window)
    assert torch.all(got["out"][:, :, rows] == 0) and torch.all(got["lse"][:, :, rows] == float("-inf"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sq,group", [(1, 1), (1, 4), (4, 4)], ids=lambda x: str(x))
@pytest.mark.parametrize("sk,d", [(129, 8), (145, 8), (145, 24), (333, 4), (1100, 48)], ids=lambda x: str(x))
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_decode_rows_ahead(cpu_unit, dtype, sq, group, sk, d, layout):
    """The K and V rows 128 keys ahead are requested while the products run, at a pace set by the span's
    lines: spans shorter than one cache line (one key of a narrow head ahead, the last of a task) and
    strided rows (bshd, requested at once) in each form of the scores."""
    q, k, v = make_qkv(1, 2 * group, 2, sq, sk, d, dtype, layout)
    check_attention(q, k, v, layout=layout, grads=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sq,hq,hkv,d", [(1, 8, 8, 64), (1, 32, 8, 128), (4, 16, 4, 72), (3, 6, 2, 40),
                                         (2, 4, 4, 128), (2, 8, 2, 64), (1, 12, 2, 128)], ids=lambda x: str(x))
def test_decode_key_major_kv(cpu_unit, restore_threads, dtype, sq, hq, hkv, d):
    """K/V laid out (batch, key, head, dim) as FlashAttention's KV cache, the filled part of a longer
    buffer: the decode walks all KV heads of a batch together, tile by tile, with the keys split over
    tasks by the thread count; a window leaves some splits without a visible key."""
    cache_k, cache_v = torch.randn(2, 1500, hkv, d).to(dtype), torch.randn(2, 1500, hkv, d).to(dtype)
    k, v = cache_k[:, :1100], cache_v[:, :1100]
    q = torch.randn(2, sq, hq, d).to(dtype)
    for n in (1, 2):
        torch.set_num_threads(n)
        check_attention(q, k, v, layout="bshd", causal="bottom_right", grads=False, what=f"threads={n}")
        check_attention(q, k, v, layout="bshd", window_size=(70, 0), grads=False, what=f"window, threads={n}")
