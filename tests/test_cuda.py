"""CUDA smoke tests: forward and backward against the reference. Skipped when no CUDA device is visible."""

import pytest
import torch

from helpers import DTYPES, check_against_torch_sdpa, check_attention, make_qkv

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
def test_cuda_forward_backward(dtype, causal):
    q, k, v = (t.cuda() for t in make_qkv(2, 8, 2, 113, 203, 64, dtype))
    got = check_attention(q, k, v, causal=causal, dlse=True)
    assert got["out"].device == q.device and got["lse"].device == q.device


def test_cuda_bshd_window():
    q, k, v = (t.cuda() for t in make_qkv(1, 4, 4, 65, 47, 128, torch.bfloat16, layout="bshd"))
    check_attention(q, k, v, layout="bshd", window_size=(8, 4))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_sdpa(dtype):
    q, k, v = (t.cuda() for t in make_qkv(2, 8, 2, 33, 47, 64, dtype))
    check_against_torch_sdpa(q, k, v, is_causal=True, enable_gqa=True)
