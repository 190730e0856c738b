"""Bad inputs: every check raises with a message that names the op, the rejected value and what is supported."""

import pytest
import torch

import attnext
from attnext import _ops


def r(*shape, dtype=torch.float32):
    return torch.randn(shape).to(dtype)


# name: (q, k, v, keyword arguments, exception, message pattern)
ATTENTION_ERRORS = {
    "q_rank3": (r(4, 5, 8), r(1, 2, 7, 8), r(1, 2, 7, 8), {}, RuntimeError,
                r"attnext\.attention: q must be a 4-D tensor \(batch, heads, seq, head_dim\), got shape \(4, 5, 8\)"),
    "k_rank5": (r(1, 4, 5, 8), r(1, 1, 2, 7, 8), r(1, 2, 7, 8), {}, RuntimeError,
                r"attnext\.attention: k must be a 4-D tensor .*got shape \(1, 1, 2, 7, 8\)"),
    "v_rank_bshd": (r(1, 5, 4, 8), r(1, 7, 2, 8), r(7, 2, 8), {"layout": "bshd"}, RuntimeError,
                    r"v must be a 4-D tensor \(batch, seq, heads, head_dim\), got shape \(7, 2, 8\)"),
    "dtypes": (r(1, 4, 5, 8), r(1, 2, 7, 8, dtype=torch.float16), r(1, 2, 7, 8), {}, RuntimeError,
               r"q, k and v must have the same dtype, got float32, float16, float32"),
    "dtypes_v": (r(1, 4, 5, 8, dtype=torch.bfloat16), r(1, 2, 7, 8, dtype=torch.bfloat16), r(1, 2, 7, 8), {},
                 RuntimeError, r"same dtype, got bfloat16, bfloat16, float32"),
    "head_dim_k": (r(1, 4, 5, 8), r(1, 2, 7, 16), r(1, 2, 7, 16), {}, RuntimeError,
                   r"head dims differ: q 8, k 16, v 16 \(q, k and v must share one head dim\)"),
    "head_dim_v": (r(1, 4, 5, 8), r(1, 2, 7, 8), r(1, 2, 7, 4), {}, RuntimeError, r"head dims differ: q 8, k 8, v 4"),
    "gqa_ratio": (r(1, 3, 5, 8), r(1, 2, 7, 8), r(1, 2, 7, 8), {}, RuntimeError,
                  r"query heads 3 must be a multiple of key/value heads 2"),
    "gqa_ratio_bshd": (r(1, 5, 6, 8), r(1, 7, 4, 8), r(1, 7, 4, 8), {"layout": "bshd"}, RuntimeError,
                       r"query heads 6 must be a multiple of key/value heads 4"),
    "q_last_dim": (r(1, 4, 8, 5).transpose(-1, -2), r(1, 2, 7, 8), r(1, 2, 7, 8), {}, RuntimeError,
                   r"q must have a contiguous last dim \(stride 1\), got stride 5"),
    "v_last_dim": (r(1, 4, 5, 8), r(1, 2, 7, 8), r(1, 2, 8, 7).transpose(-1, -2), {}, RuntimeError,
                   r"v must have a contiguous last dim \(stride 1\), got stride 7"),
    "float64": (r(1, 4, 5, 8, dtype=torch.float64), r(1, 2, 7, 8, dtype=torch.float64),
                r(1, 2, 7, 8, dtype=torch.float64), {}, RuntimeError,
                r"attnext\.attention: dtype float64 is not supported \(supported: float32, float16, bfloat16\)"),
    "int32": (*(torch.ones(s, dtype=torch.int32) for s in ((1, 4, 5, 8), (1, 2, 7, 8), (1, 2, 7, 8))), {},
              RuntimeError, r"attnext\.attention: dtype int32 is not supported \(supported: float32, float16, bfloat16\)"),
    "head_dim_513": (r(1, 1, 2, 513), r(1, 1, 3, 513), r(1, 1, 3, 513), {}, RuntimeError,
                     r"attnext\.attention: head_dim 513 is not supported on CPU \(supported: 1\.\.512\)"),
    "head_dim_0": (r(1, 1, 2, 0), r(1, 1, 3, 0), r(1, 1, 3, 0), {}, RuntimeError,
                   r"head_dim 0 is not supported on CPU \(supported: 1\.\.512\)"),
    "batch": (r(1, 4, 5, 8), r(2, 2, 7, 8), r(2, 2, 7, 8), {}, RuntimeError, r"batch sizes differ: q 1, k 2, v 2"),
    "batch_v": (r(2, 4, 5, 8), r(2, 2, 7, 8), r(3, 2, 7, 8), {}, RuntimeError, r"batch sizes differ: q 2, k 2, v 3"),
    "kv_seq": (r(1, 4, 5, 8), r(1, 2, 7, 8), r(1, 2, 6, 8), {}, RuntimeError,
               r"k and v shapes differ: k \(1, 2, 7, 8\), v \(1, 2, 6, 8\)"),
    "kv_heads": (r(1, 4, 5, 8), r(1, 2, 7, 8), r(1, 1, 7, 8), {}, RuntimeError,
                 r"k and v shapes differ: k \(1, 2, 7, 8\), v \(1, 1, 7, 8\)"),
    "causal_str": (r(1, 4, 5, 8), r(1, 2, 7, 8), r(1, 2, 7, 8), {"causal": "bottom"}, ValueError,
                   r"attnext\.attention: causal='bottom' is not supported \(supported: False, True \(= 'top_left'\), "
                   r"'top_left', 'bottom_right'\)"),
    "causal_int": (r(1, 4, 5, 8), r(1, 2, 7, 8), r(1, 2, 7, 8), {"causal": 1}, ValueError,
                   r"causal=1 is not supported"),
    "causal_none": (r(1, 4, 5, 8), r(1, 2, 7, 8), r(1, 2, 7, 8), {"causal": None}, ValueError,
                    r"causal=None is not supported"),
    "layout": (r(1, 4, 5, 8), r(1, 2, 7, 8), r(1, 2, 7, 8), {"layout": "sbhd"}, ValueError,
               r"attnext\.attention: layout='sbhd' is not supported \(supported: 'bhsd', 'bshd'\)"),
    "window_negative": (r(1, 4, 5, 8), r(1, 2, 7, 8), r(1, 2, 7, 8), {"window_size": (-2, 0)}, ValueError,
                        r"window_size=\(-2, 0\) is not supported \(supported: \(left, right\) with each -1 for "
                        r"unbounded or >= 0\)"),
    "window_length": (r(1, 4, 5, 8), r(1, 2, 7, 8), r(1, 2, 7, 8), {"window_size": (1, 2, 3)}, ValueError,
                      r"window_size=\(1, 2, 3\) is not supported"),
    "window_float": (r(1, 4, 5, 8), r(1, 2, 7, 8), r(1, 2, 7, 8), {"window_size": (1.5, 0)}, ValueError,
                     r"window_size=\(1\.5, 0\) is not supported"),
    "window_scalar": (r(1, 4, 5, 8), r(1, 2, 7, 8), r(1, 2, 7, 8), {"window_size": 3}, ValueError,
                      r"window_size=3 is not supported"),
    "window_causal_right": (r(1, 4, 5, 8), r(1, 2, 7, 8), r(1, 2, 7, 8), {"causal": True, "window_size": (1, 2)},
                            ValueError, r"window_size right=2 with causal=True is not supported "
                                        r"\(supported with causal: -1 or 0\)"),
    "not_a_tensor": ([[1.0]], r(1, 2, 7, 8), r(1, 2, 7, 8), {}, TypeError,
                     r"attnext\.attention: q must be a torch\.Tensor, got list"),
    "v_not_a_tensor": (r(1, 4, 5, 8), r(1, 2, 7, 8), 3.0, {}, TypeError,
                       r"attnext\.attention: v must be a torch\.Tensor, got float"),
    "window_list_no_mask": (r(1, 4, 5, 8), r(1, 2, 7, 8), r(1, 2, 7, 8), {"window_size": [-1, -2]}, ValueError,
                            r"window_size=\[-1, -2\] is not supported"),
}


@pytest.mark.parametrize("case", ATTENTION_ERRORS)
def test_attention_rejects(case):
    q, k, v, kw, exc, pattern = ATTENTION_ERRORS[case]
    with pytest.raises(exc, match=pattern):
        attnext.attention(q, k, v, **kw)


def test_bad_input_in_empty_call():
    """Checks run before the empty-tensor shortcut."""
    with pytest.raises(RuntimeError, match=r"query heads 3 must be a multiple of key/value heads 2"):
        attnext.attention(r(0, 3, 5, 8), r(0, 2, 7, 8), r(0, 2, 7, 8))
    with pytest.raises(RuntimeError, match=r"head_dim 600 is not supported on CPU"):
        attnext.attention(r(0, 1, 5, 600), r(0, 1, 7, 600), r(0, 1, 7, 600))


def test_cuda_tensor_without_cuda_module():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    if _ops.CUDA_MODULE_ERROR is None:
        pytest.skip("attnext's CUDA module is loaded")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(1, 2, 5, 8, device="cuda")
        with pytest.raises(RuntimeError, match=r"attnext\.attention: q is on cuda:0 but attnext's CUDA module is "
                                               r"not available \(.+\); supported here: cpu"):
            attnext.attention(q, q, q)


def test_op_mask_kind():
    with pytest.raises(RuntimeError, match=r"attnext\.attention: mask kind 7 is not supported \(supported: 0 none, "
                                           r"1 causal top-left, 2 causal bottom-right, 3 window\)"):
        torch.ops.attnext.fwd(r(1, 2, 3, 4), r(1, 2, 3, 4), r(1, 2, 3, 4), 1.0, 7, -1, -1, False)


def test_op_window():
    with pytest.raises(RuntimeError, match=r"window \(-5, -1\) is not supported \(each side -1 for unbounded or "
                                           r">= 0\)"):
        torch.ops.attnext.fwd(r(1, 2, 3, 4), r(1, 2, 3, 4), r(1, 2, 3, 4), 1.0, 3, -5, -1, False)


def _bwd_args(**change):
    q, k, v = r(1, 4, 5, 8), r(1, 2, 7, 8), r(1, 2, 7, 8)
    out, lse = torch.ops.attnext.fwd(q, k, v, 0.35, 0, -1, -1, False)
    args = dict(dout=torch.randn_like(out), q=q, k=k, v=v, out=out, lse=lse, dlse=None)
    args.update(change)
    return (*args.values(), 0.35, 0, -1, -1, False, False)


BWD_ERRORS = {
    "out_shape": (dict(out=r(1, 4, 6, 8)),
                  r"attnext\.attention backward: out \(1, 4, 6, 8\) and grad_out \(1, 4, 5, 8\) must have q's shape "
                  r"\(1, 4, 5, 8\)"),
    "grad_out_shape": (dict(dout=r(1, 2, 5, 8)), r"grad_out \(1, 2, 5, 8\) must have q's shape"),
    "grad_out_dtype": (dict(dout=r(1, 4, 5, 8, dtype=torch.float16)),
                       r"out and grad_out must have q's dtype float32, got float32 and float16"),
    "grad_out_last_dim": (dict(dout=r(1, 4, 8, 5).transpose(-1, -2)),
                          r"attnext\.attention backward: grad_out must have a contiguous last dim"),
    "lse_shape": (dict(lse=r(1, 4, 6)), r"lse must be a contiguous float32 tensor of shape \(1, 4, 5\), got "
                                        r"float32 \(1, 4, 6\)"),
    "lse_dtype": (dict(lse=r(1, 4, 5, dtype=torch.float16)), r"lse must be a contiguous float32 tensor"),
    "lse_strided": (dict(lse=r(1, 4, 10)[..., ::2]), r"lse must be a contiguous float32 tensor"),
    "dlse_shape": (dict(dlse=r(1, 4)), r"dlse must be a contiguous float32 CPU tensor shaped like lse, got "
                                       r"float32 \(1, 4\)"),
    "dlse_dtype": (dict(dlse=r(1, 4, 5, dtype=torch.bfloat16)), r"dlse must be a contiguous float32 CPU tensor"),
    "q_dtype": (dict(q=r(1, 4, 5, 8, dtype=torch.float16)),
                r"attnext\.attention backward: q, k and v must have the same dtype"),
}


@pytest.mark.parametrize("case", BWD_ERRORS)
def test_bwd_op_rejects(case):
    change, pattern = BWD_ERRORS[case]
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.attnext.bwd(*_bwd_args(**change))


DOUBLE_BACKWARD = r"attnext\.attention: double backward .* is not supported \(supported: first-order gradients\)"


@pytest.mark.parametrize("path", ["eager", "op"])
def test_double_backward_raises(path):
    """create_graph=True gives the same first-order gradients; differentiating them again raises (without the
    mark, torch warned and took the backward kernel's gradient as 0)."""
    torch.manual_seed(0)
    q, k, v = (r(1, 2, 6, 8).requires_grad_() for _ in range(3))

    def loss():
        if path == "eager":
            out = attnext.attention(q, k, v)
        else:
            out = torch.ops.attnext.fwd(q, k, v, 0.3, _ops.MASK_NONE, -1, -1, False, False)[0]
        return out.square().sum()

    grads = torch.autograd.grad(loss(), (q, k, v), create_graph=True)
    assert all(torch.equal(g, h) for g, h in zip(grads, torch.autograd.grad(loss(), (q, k, v))))
    grads[0].mul_(2)  # the marked gradients are not views: they may be edited in place
    for g in grads:
        with pytest.raises(RuntimeError, match=DOUBLE_BACKWARD):
            torch.autograd.grad(g.sum(), (q, k, v))


def test_sdpa_gqa_needs_enable_gqa():
    with pytest.raises(RuntimeError, match=r"attnext\.scaled_dot_product_attention: query heads 4 != key/value "
                                           r"heads 2; pass enable_gqa=True for grouped-query attention"):
        attnext.scaled_dot_product_attention(r(1, 4, 5, 8), r(1, 2, 7, 8), r(1, 2, 7, 8))


def test_sdpa_gqa_ratio():
    with pytest.raises(RuntimeError, match=r"query heads 3 must be a multiple of key/value heads 2"):
        attnext.scaled_dot_product_attention(r(1, 3, 5, 8), r(1, 2, 7, 8), r(1, 2, 7, 8), enable_gqa=True)


@pytest.mark.parametrize("kw,pattern", [
    (dict(dropout_p=0.1), r"attnext\.flash_attn_func: dropout_p=0\.1 is not supported \(supported: 0\.0\)"),
    (dict(softcap=30.0), r"attnext\.flash_attn_func: softcap=30\.0 is not supported \(supported: 0\.0\)"),
    (dict(alibi_slopes=torch.ones(4)), r"attnext\.flash_attn_func: alibi_slopes is not supported "
                                       r"\(supported: None\)"),
])
def test_flash_attn_func_rejects(kw, pattern):
    q, k, v = r(1, 5, 4, 8), r(1, 7, 2, 8), r(1, 7, 2, 8)
    with pytest.raises(NotImplementedError, match=pattern):
        attnext.flash_attn_func(q, k, v, **kw)


def test_flash_attn_func_rejects_bad_window():
    with pytest.raises(ValueError, match=r"attnext\.attention: window_size=\(-3, 0\) is not supported"):
        attnext.flash_attn_func(r(1, 5, 4, 8), r(1, 7, 2, 8), r(1, 7, 2, 8), window_size=(-3, 0))


def test_set_cpu_unit_unknown():
    before = _ops.cpu_unit()
    with pytest.raises(ValueError, match=r"attnext\.set_cpu_unit: unit 'neon' is not known "
                                         r"\(known: scalar, avx2, avx512, avx512bf16\)"):
        _ops.set_cpu_unit("neon")
    assert _ops.cpu_unit() == before


def test_set_cpu_unit_not_runnable():
    missing = [u for u in _ops.CPU_UNITS if u not in _ops.cpu_units_runnable()]
    if not missing:
        pytest.skip("every known unit runs on this CPU")
    before = _ops.cpu_unit()
    with pytest.raises(ValueError, match=rf"attnext\.set_cpu_unit: unit '{missing[0]}' cannot run here "
                                         r"\(runnable: .*scalar.*\)"):
        _ops.set_cpu_unit(missing[0])
    assert _ops.cpu_unit() == before


def test_set_cpu_isa_op_unknown():
    with pytest.raises(RuntimeError, match=r"attnext\.set_cpu_isa: unit 9 is not known \(known: 0 scalar, 1 avx2, "
                                           r"2 avx512, 3 avx512bf16\)"):
        torch.ops.attnext.set_cpu_isa(9)
