"""Public attention functions: attnext's own API, a drop-in for torch's SDPA, and a FlashAttention-shaped one.

All three reach the same kernel, with autograd and torch.compile support: a call that needs no gradient (grad
mode off, or no input requiring grad) takes torch.ops.attnext.fwd_inference, the kernel without the autograd
layer; one that does takes torch.ops.attnext.fwd under torch.compile (and torch.jit.trace) and its
autograd.Function twin (_ops.EagerFwd, the same backward) in eager mode; under torch.func.grad, _ops.FuncFwd.
"""

import math
import os
import warnings

import torch
import torch.nn.functional as F

from attnext import _nvtx, _ops

_CAUSAL = {False: _ops.MASK_NONE, True: _ops.MASK_CAUSAL_TOP_LEFT, "top_left": _ops.MASK_CAUSAL_TOP_LEFT,
           "bottom_right": _ops.MASK_CAUSAL_BOTTOM_RIGHT}
_FWD, _FWD_INFERENCE = torch.ops.attnext.fwd.default, torch.ops.attnext.fwd_inference.default
_peek_transforms = torch._C._functorch.peek_interpreter_stack  # None unless a torch.func transform is active
_forward_ad = _ops.forward_ad  # its (private) _current_level is -1 outside a dual level
_any_autocast = torch._C._is_any_autocast_enabled
CUDA_MAX_HEAD_DIM = 256
CUDA_MAX_GRID = 65535  # batch and heads are CUDA grid dimensions


def _check_device(op, q):
    if q.device.type == "cpu" or q.device.type == "meta":
        return
    if q.device.type == "cuda":
        if _ops.CUDA_MODULE_ERROR is not None:
            raise RuntimeError(f"{op}: q is on {q.device} but attnext's CUDA module is not available "
                               f"({_ops.CUDA_MODULE_ERROR}); supported here: cpu")
        return
    raise RuntimeError(f"{op}: device {q.device} is not supported (supported: cpu, cuda)")


def _autocast(q, k, v):
    """torch.autocast's policy for torch's SDPA (a lower-precision op): where autocast is on for the inputs'
    device (cpu or cuda), floating inputs other than float64 are cast to its dtype (above the autograd
    layer: their gradients come back in their own dtype)."""
    device = q.device.type
    if (device != "cpu" and device != "cuda") or not torch.is_autocast_enabled(device):
        return q, k, v
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t.is_floating_point() and t.dtype not in (dtype, torch.float64) else t
                 for t in (q, k, v))


def _mask_args(op, causal, window_size):
    if isinstance(causal, str) or isinstance(causal, bool):
        kind = _CAUSAL.get(causal)
    else:
        kind = None
    if kind is None:
        raise ValueError(f"{op}: causal={causal!r} is not supported "
                         "(supported: False, True (= 'top_left'), 'top_left', 'bottom_right')")
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, int) and w >= -1 for w in window_size)):
        raise ValueError(f"{op}: window_size={window_size!r} is not supported "
                         "(supported: (left, right) with each -1 for unbounded or >= 0)")
    left, right = window_size
    if kind != _ops.MASK_NONE:
        if right not in (-1, 0):
            raise ValueError(f"{op}: window_size right={right} with causal={causal!r} is not supported "
                             "(supported with causal: -1 or 0)")
        return kind, left, -1
    if (left, right) != (-1, -1):
        return _ops.MASK_WINDOW, left, right
    return kind, -1, -1


def attention(q, k, v, *, causal=False, scale=None, layout="bhsd", return_lse=False, window_size=(-1, -1),
              deterministic=False):
    """Exact attention softmax(q·kᵀ·scale + mask)·v, differentiable, without materialising the scores.

    q: (B, Hq, Sq, D), k and v: (B, Hkv, Sk, D) for layout "bhsd"; (B, S, H, D) for layout "bshd".
    Hq must be a multiple of Hkv (grouped-query attention; no K/V copies). Any strides with a
    contiguous last dim. float32, float16 or bfloat16; accumulation in float32. Under torch.autocast,
    the inputs are cast to its dtype, as torch's SDPA casts them.
    causal: False; True or "top_left" (query i sees keys j <= i, SDPA's is_causal); "bottom_right"
        (query i sees keys j <= i + Sk - Sq, FlashAttention's causal).
    scale: defaults to 1/sqrt(D).
    window_size: (left, right) keys around the bottom-right diagonal, -1 = unbounded (FlashAttention's).
    return_lse: also return lse, (B, Hq, Sq) float32, natural log of each row's softmax denominator;
        -inf for rows with no visible key (whose output is 0).
    deterministic: a bitwise repeatable backward (the CPU backward always is).
    """
    # The common call (CPU tensors, no mask, no NVTX) takes as few Python steps as it can: a call that follows
    # other work (a model's other layers) finds this path out of the caches, where each step costs microseconds.
    op = "attnext.attention"
    if layout == "bhsd" or layout == "bshd":
        bshd = layout == "bshd"
    else:
        raise ValueError(f"{op}: layout={layout!r} is not supported (supported: 'bhsd', 'bshd')")
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
        name, t = next((n, t) for n, t in (("q", q), ("k", k), ("v", v)) if not isinstance(t, torch.Tensor))
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not q.is_cpu:
        _check_device(op, q)
    if _any_autocast():
        q, k, v = _autocast(q, k, v)
    if causal is False and type(window_size) is tuple and window_size == (-1, -1):
        kind, left, right = _ops.MASK_NONE, -1, -1
    else:
        kind, left, right = _mask_args(op, causal, window_size)
    if scale is None:
        d = q.shape[-1] if q.dim() > 0 else 0
        scale = 1.0 / math.sqrt(d) if d > 0 else 1.0
    needs_grad = (q.requires_grad or k.requires_grad or v.requires_grad) and torch.is_grad_enabled()
    transformed = _peek_transforms() is not None or _forward_ad._current_level >= 0
    if transformed and not torch.compiler.is_compiling():  # compile's tracing runs under a functorch transform
        fwd = _ops.transform_fwd(q, k, v, needs_grad)  # torch.func transforms, forward-mode AD
    elif not needs_grad:
        fwd = _FWD_INFERENCE
    else:
        fwd = _FWD if torch.compiler.is_compiling() or torch.jit.is_tracing() else _ops.EagerFwd.apply
    if _nvtx.op_ranges_enabled():
        with _nvtx.op_range("attnext.fwd", q, k, kind, left, right, bshd):
            out, lse = fwd(q, k, v, float(scale), kind, left, right, bshd, deterministic)
    else:
        out, lse = fwd(q, k, v, float(scale), kind, left, right, bshd, deterministic)
    return (out, lse) if return_lse else out


_warned = set()


def _fallback(reason, *args, **kwargs):
    """torch's SDPA for what the kernels do not cover: once-per-reason warning, or an error under ATTNEXT_STRICT=1."""
    op = "attnext.scaled_dot_product_attention"
    if os.environ.get("ATTNEXT_STRICT") == "1":
        raise NotImplementedError(f"{op}: {reason}, and ATTNEXT_STRICT=1 forbids falling back to torch's SDPA")
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"{op}: {reason}; falling back to torch.nn.functional.scaled_dot_product_attention "
                      "(warned once; ATTNEXT_STRICT=1 makes this an error)", stacklevel=3)
    return F.scaled_dot_product_attention(*args, **kwargs)


def _sdpa_unsupported(query, key, value, attn_mask, dropout_p):
    if attn_mask is not None:
        return "attn_mask is not supported by attnext's kernels yet"
    if dropout_p > 0.0:
        return f"dropout_p={dropout_p} is not supported by attnext's kernels yet"
    if query.dim() not in (3, 4) or key.dim() != query.dim() or value.dim() != query.dim():
        return f"inputs of rank {query.dim()} are not supported (supported: 3-D or 4-D)"
    if value.shape[-1] != query.shape[-1]:
        return f"value head dim {value.shape[-1]} != query head dim {query.shape[-1]} is not supported"
    if query.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {query.dtype} is not supported (supported: float32, float16, bfloat16)"
    if query.is_cuda and (reason := _cuda_unsupported(query, key, value)) is not None:
        return reason
    if not (query.is_cpu or query.is_cuda or query.is_meta):
        return f"device {query.device} is not supported"
    for t in (query, key, value):
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            return "inputs whose last dim is not contiguous are not supported"
    return None


def _cuda_unsupported(query, key, value):
    """Why the CUDA kernels cannot take these inputs (None if they can): the SDPA drop-in falls back on it."""
    if _ops.CUDA_MODULE_ERROR is not None:
        return "attnext's CUDA module is not available"
    if query.dtype == torch.float32:
        return "float32 on CUDA is not supported by attnext's kernels (supported: float16, bfloat16)"
    d = query.shape[-1]
    if d % 8 != 0 or not 8 <= d <= CUDA_MAX_HEAD_DIM:
        return f"head dim {d} on CUDA is not supported (supported: 8..{CUDA_MAX_HEAD_DIM}, multiple of 8)"
    if query.dim() == 4 and max(query.shape[0], query.shape[1]) > CUDA_MAX_GRID:
        return f"batch and query heads above {CUDA_MAX_GRID} on CUDA are not supported"
    if any(_ops._cuda_misaligned(t) for t in (query, key, value)):
        return "CUDA inputs need 16-byte aligned rows (strides that are multiples of 8 elements)"
    return None


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """Drop-in for torch.nn.functional.scaled_dot_product_attention (same arguments and semantics:
    is_causal is top-left aligned). Options the kernels do not cover yet (attn_mask, dropout_p > 0,
    other ranks or dtypes) fall back to torch's SDPA with a one-time warning; ATTNEXT_STRICT=1 makes
    every fallback an error."""
    if _any_autocast():  # as attention() does, but first: the checks below see the dtype the kernels get
        query, key, value = _autocast(query, key, value)
    reason = _sdpa_unsupported(query, key, value, attn_mask, dropout_p)
    if reason is not None:
        return _fallback(reason, query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                         scale=scale, enable_gqa=enable_gqa)
    squeeze = query.dim() == 3
    if squeeze:  # (N, L, E): one head
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise RuntimeError(f"attnext.scaled_dot_product_attention: query heads {query.shape[1]} != key/value heads "
                           f"{key.shape[1]}; pass enable_gqa=True for grouped-query attention")
    out = attention(query, key, value, causal=bool(is_causal), scale=scale)
    return out.squeeze(1) if squeeze else out


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """FlashAttention-compatible: q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D); causal is bottom-right aligned.
    With return_attn_probs, returns (out, lse, None): attention probabilities are never materialised."""
    op = "attnext.flash_attn_func"
    if dropout_p != 0.0:
        raise NotImplementedError(f"{op}: dropout_p={dropout_p} is not supported (supported: 0.0)")
    if softcap != 0.0:
        raise NotImplementedError(f"{op}: softcap={softcap} is not supported (supported: 0.0)")
    if alibi_slopes is not None:
        raise NotImplementedError(f"{op}: alibi_slopes is not supported (supported: None)")
    out, lse = attention(q, k, v, causal="bottom_right" if causal else False, scale=softmax_scale, layout="bshd",
                         return_lse=True, window_size=tuple(window_size), deterministic=deterministic)
    return (out, lse, None) if return_attn_probs else out
