"""The exhaustive grid: every size pair of the design list with every mask, GQA ratio, a sweep of head dims and
every dtype, on every runnable CPU unit. Runs only with ATTNEXT_EXHAUSTIVE=1 (it takes tens of minutes)."""

import itertools

import pytest

from helpers import DTYPES, check_attention, make_qkv

pytestmark = pytest.mark.slow

SIZES = (1, 17, 113, 203, 1023, 1025)
MASKS = [(False, (-1, -1)), ("top_left", (-1, -1)), ("bottom_right", (-1, -1)), (False, (64, 0)),
         (False, (7, 9)), ("bottom_right", (32, -1)), ("top_left", (0, 0))]
HEAD_DIMS = (1, 3, 8, 16, 24, 32, 40, 48, 64, 72, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512)
GQA = [(1, 1), (2, 2), (4, 2), (8, 2), (8, 1)]


@pytest.mark.parametrize("mask", MASKS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sizes_grid(cpu_unit, dtype, mask):
    causal, window = mask
    for sq, sk in itertools.product(SIZES, SIZES):
        q, k, v = make_qkv(1, 2, 1, sq, sk, 64, dtype)
        check_attention(q, k, v, causal=causal, window_size=window, dlse=True, what=f"Sq={sq} Sk={sk}")


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_head_dims_grid(cpu_unit, dtype, d):
    for (hq, hkv), (sq, sk), (causal, window) in itertools.product(GQA, [(1, 65), (65, 1), (63, 129), (129, 63)],
                                                                   MASKS[:3]):
        q, k, v = make_qkv(2, hq, hkv, sq, sk, d, dtype)
        check_attention(q, k, v, causal=causal, window_size=window, what=f"D={d}")


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gqa_layout_grid(cpu_unit, dtype, layout):
    for (hq, hkv), (causal, window) in itertools.product(GQA + [(16, 2), (12, 3), (7, 7)], MASKS):
        q, k, v = make_qkv(3, hq, hkv, 77, 131, 48, dtype, layout)
        check_attention(q, k, v, causal=causal, window_size=window, layout=layout, dlse=True)
