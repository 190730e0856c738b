"""The public entry points: the SDPA drop-in (and its fallbacks), flash_attn_func, the mask semantics as
documented, CPU unit selection, and importing without touching CUDA."""

import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import attnext
import attnext.api
from attnext import _ops
from helpers import DTYPES, check_against_torch_sdpa, make_qkv


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(64, 64), (40, 70), (70, 40)])
def test_sdpa_matches_torch(cpu_unit, dtype, is_causal, sq, sk):
    """is_causal is top-left aligned, as in torch, also when Sq != Sk."""
    q, k, v = make_qkv(2, 4, 4, sq, sk, 32, dtype)
    check_against_torch_sdpa(q, k, v, is_causal=is_causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sdpa_scale_and_gqa(cpu_unit, dtype):
    q, k, v = make_qkv(2, 8, 2, 45, 61, 32, dtype)
    check_against_torch_sdpa(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)


@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_3d(cpu_unit, is_causal):
    """(N, L, E) inputs run natively (no fallback warning) and keep their rank."""
    q, k, v = (torch.randn(3, n, 24) for n in (37, 50, 50))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_against_torch_sdpa(q, k, v, is_causal=is_causal)


def test_sdpa_non_contiguous(cpu_unit):
    q, k, v = (t.transpose(1, 2) for t in make_qkv(2, 4, 2, 33, 40, 16, layout="bshd"))
    check_against_torch_sdpa(q, k, v, enable_gqa=True)


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Forget which fallback reasons were already warned about; ATTNEXT_STRICT unset."""
    monkeypatch.setattr(attnext.api, "_warned", set())
    monkeypatch.delenv("ATTNEXT_STRICT", raising=False)


def _fake_cuda(*shape):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return torch.empty(shape, device="cuda")


def _qkv():
    return make_qkv(1, 2, 2, 5, 7, 8)


# case: (q, k, v and extra arguments, a piece of the warning)
FALLBACKS = {
    "bool_mask": (lambda: (*_qkv(), dict(attn_mask=torch.rand(5, 7) > 0.3)), "attn_mask is not supported"),
    "float_mask": (lambda: (*_qkv(), dict(attn_mask=torch.randn(1, 1, 5, 7))), "attn_mask is not supported"),
    "dropout": (lambda: (*_qkv(), dict(dropout_p=0.25)), "dropout_p=0.25 is not supported"),
    "rank5": (lambda: (*[torch.randn(2, 1, 2, 5, 8)] * 3, {}), "inputs of rank 5 are not supported"),
    "rank2": (lambda: (*[torch.randn(5, 8)] * 3, {}), "inputs of rank 2 are not supported"),
    "float64": (lambda: (*make_qkv(1, 2, 2, 5, 7, 8, torch.float64), {}), "dtype torch.float64 is not supported"),
    "value_dim": (lambda: (torch.randn(1, 2, 5, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 4), {}),
                  "value head dim 4 != query head dim 8"),
    "last_dim_strided": (lambda: (*[t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in _qkv()], {}),
                         "last dim is not contiguous"),
}


@pytest.mark.parametrize("case", FALLBACKS)
def test_sdpa_fallback_warns_once_and_matches_torch(fresh_warnings, case):
    make, message = FALLBACKS[case]
    q, k, v, kw = make()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(1)
        got = attnext.scaled_dot_product_attention(q, k, v, **kw)
        torch.manual_seed(1)
        again = attnext.scaled_dot_product_attention(q, k, v, **kw)
    torch.manual_seed(1)
    want = F.scaled_dot_product_attention(q, k, v, **kw)
    assert torch.equal(got, want) and torch.equal(again, want)
    assert len(caught) == 1, [str(w.message) for w in caught]
    w = caught[0]
    assert issubclass(w.category, UserWarning)
    assert message in str(w.message) and "falling back" in str(w.message)
    assert w.filename == __file__, "the warning should point at the caller"


def test_sdpa_fallback_warns_once_per_reason(fresh_warnings):
    q, k, v = make_qkv(1, 2, 2, 5, 7, 8)
    mask = torch.ones(5, 7, dtype=torch.bool)
    with pytest.warns(UserWarning, match="attn_mask is not supported"):
        attnext.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attnext.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        attnext.scaled_dot_product_attention(q, k, v)  # supported: no warning either
    with pytest.warns(UserWarning, match="dropout_p=0.5 is not supported"):
        attnext.scaled_dot_product_attention(q, k, v, dropout_p=0.5)


def test_sdpa_fallback_cuda_without_module(fresh_warnings):
    if _ops.CUDA_MODULE_ERROR is None:
        pytest.skip("attnext's CUDA module is available")
    q = _fake_cuda(1, 2, 5, 8)
    with pytest.warns(UserWarning, match="CUDA module is not available"):
        out = attnext.scaled_dot_product_attention(q, q, q)
    assert out.shape == q.shape and out.device.type == "cuda"


@pytest.mark.parametrize("case", FALLBACKS)
def test_sdpa_strict_raises(fresh_warnings, monkeypatch, case):
    make, _ = FALLBACKS[case]
    monkeypatch.setenv("ATTNEXT_STRICT", "1")
    q, k, v, kw = make()
    with pytest.raises(NotImplementedError, match="ATTNEXT_STRICT=1 forbids falling back"):
        attnext.scaled_dot_product_attention(q, k, v, **kw)


def test_sdpa_strict_allows_supported(fresh_warnings, monkeypatch):
    monkeypatch.setenv("ATTNEXT_STRICT", "1")
    q, k, v = make_qkv(1, 4, 2, 5, 7, 8)
    out = attnext.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert out.shape == q.shape


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(17, 40), (40, 17), (1, 33)])
def test_flash_attn_func_is_bottom_right(cpu_unit, dtype, causal, sq, sk):
    q, k, v = make_qkv(2, 4, 2, sq, sk, 32, dtype, layout="bshd")
    out = attnext.flash_attn_func(q, k, v, causal=causal, softmax_scale=0.2)
    want = attnext.attention(q, k, v, layout="bshd", causal="bottom_right" if causal else False, scale=0.2)
    assert out.shape == (2, sq, 4, 32)
    assert torch.equal(out, want)


def test_flash_attn_func_window_and_probs(cpu_unit):
    q, k, v = make_qkv(1, 4, 1, 30, 45, 16, layout="bshd")
    got = attnext.flash_attn_func(q, k, v, window_size=(5, 2), return_attn_probs=True, deterministic=True)
    assert isinstance(got, tuple) and len(got) == 3 and got[2] is None
    out, lse = attnext.attention(q, k, v, layout="bshd", window_size=(5, 2), return_lse=True)
    assert torch.equal(got[0], out) and torch.equal(got[1], lse)
    assert got[1].shape == (1, 4, 30) and got[1].dtype == torch.float32
    causal = attnext.flash_attn_func(q, k, v, causal=True, window_size=[3, 0], return_attn_probs=True)
    want = attnext.attention(q, k, v, layout="bshd", causal="bottom_right", window_size=(3, 0), return_lse=True)
    assert torch.equal(causal[0], want[0]) and torch.equal(causal[1], want[1])


def _expected_visible(sq, sk, alignment, left=-1, right=-1):
    """Key j visible from query i, written from the documented semantics (not from attnext.reference)."""
    rows = []
    for i in range(sq):
        diag = i if alignment == "top_left" else i + sk - sq
        rows.append([(left < 0 or j >= diag - left) and (right < 0 or j <= diag + right) for j in range(sk)])
    return torch.tensor(rows, dtype=torch.bool).reshape(sq, sk)


@pytest.mark.parametrize("sq,sk", [(5, 9), (9, 5), (6, 6)])
@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), ("top_left", (2, -1)), ("bottom_right", (-1, -1)),
                                           ("bottom_right", (1, 0)), (False, (1, 2)), (False, (-1, 0)),
                                           (False, (0, -1))])
def test_mask_semantics(cpu_unit, sq, sk, causal, window):
    """q = 0 gives uniform weights over the visible keys; with v = identity, out[i, j] = 1/n_i if key j is
    visible from row i, so out spells the mask. Rows that see no key give 0."""
    alignment = "top_left" if causal in (True, "top_left") else "bottom_right"
    right = 0 if causal else window[1]
    want = _expected_visible(sq, sk, alignment, window[0], right)
    d = 16
    q = torch.zeros(1, 1, sq, d)
    v = torch.eye(sk, d).reshape(1, 1, sk, d)
    out = attnext.attention(q, torch.randn(1, 1, sk, d), v, causal=causal, window_size=window)[0, 0, :, :sk]
    n = want.sum(dim=1, keepdim=True).clamp(min=1)
    torch.testing.assert_close(out, want / n, rtol=1e-6, atol=1e-7)


def test_cpu_units(cpu_unit):
    units = _ops.cpu_units_runnable()
    assert "scalar" in units and set(units) <= set(_ops.CPU_UNITS)
    assert _ops.cpu_unit() == cpu_unit
    previous = _ops.set_cpu_unit("scalar")
    try:
        assert previous == cpu_unit and _ops.cpu_unit() == "scalar"
    finally:
        _ops.set_cpu_unit(previous)


def test_import_does_not_touch_cuda():
    """Importing attnext (and these tests' helpers) must not query CUDA."""
    code = (
        "import torch, torch.cuda\n"
        "def boom(*a, **k): raise AssertionError('CUDA queried at import')\n"
        "for name in ('is_available', 'device_count', 'init', 'current_device', 'get_device_properties'):\n"
        "    setattr(torch.cuda, name, boom)\n"
        "import attnext, attnext.reference, helpers\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    env = dict(os.environ, PYTHONPATH=os.path.dirname(__file__))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr


def test_cpu_fma_peak_is_measured_and_checks_its_argument():
    assert torch.ops.attnext.cpu_fma_peak(200000) > 0.0
    with pytest.raises(RuntimeError, match=r"attnext\.cpu_fma_peak: iters 0 must be positive"):
        torch.ops.attnext.cpu_fma_peak(0)


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_casts_like_torch_sdpa(cpu_unit, autocast_dtype):
    """Under torch.autocast float32 (and mixed) inputs are cast to its dtype, as torch's SDPA casts them; the
    gradients come back in float32, those of the explicitly cast call."""
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 4, 2, 9, 13, 16))
    with torch.autocast("cpu", dtype=autocast_dtype):
        out = attnext.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        assert out.dtype == F.scaled_dot_product_attention(q, k, v, enable_gqa=True).dtype == autocast_dtype
        mixed = attnext.attention(q.detach().bfloat16(), k.detach(), v.detach().half())
        assert mixed.dtype == autocast_dtype
    cast = attnext.attention(*(t.to(autocast_dtype) for t in (q, k, v)))
    assert torch.equal(out, cast)
    got = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    want = torch.autograd.grad(cast.float().square().sum(), (q, k, v))
    assert all(g.dtype == torch.float32 and torch.equal(g, w) for g, w in zip(got, want))


def test_autocast_leaves_meta_tensors():
    """autocast has no meta device: meta inputs (shapes only) keep their dtype, as outside autocast."""
    q, k, v = (t.to("meta") for t in make_qkv(1, 2, 2, 9, 13, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attnext.attention(q, k, v)
    assert out.device.type == "meta" and out.dtype == torch.float32 and out.shape == q.shape
