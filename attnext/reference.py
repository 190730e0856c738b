"""Reference attention with plain torch ops: the exact semantics every attnext kernel is checked against.

attention_reference(..., upcast=True) computes in float64 on CPU (float32 on GPU): the "high" reference.
attention_reference(..., upcast=False) keeps the input dtype at each stage boundary (the scores, the
probabilities and the output are rounded to it, with float32 arithmetic in between): the "low" reference
that FlashAttention's tolerance rule compares against. It never uses 16-bit torch.matmul, which is
a scalar loop on CPUs without AVX-512.
"""

import math

import torch


def visible(seq_q, seq_k, causal=False, window_size=(-1, -1), device="cpu"):
    """Boolean (Sq, Sk): key j visible from query i, by the rule of csrc/include/attnext/mask.h."""
    if causal in (True, "top_left"):
        offset, left, right = 0, window_size[0], 0
    elif causal == "bottom_right":
        offset, left, right = seq_k - seq_q, window_size[0], 0
    else:
        offset, (left, right) = seq_k - seq_q, window_size
    i = torch.arange(seq_q, device=device).unsqueeze(1)
    j = torch.arange(seq_k, device=device).unsqueeze(0)
    ok = torch.ones(seq_q, seq_k, dtype=torch.bool, device=device)
    if left >= 0:
        ok &= j >= i + offset - left
    if right >= 0:
        ok &= j <= i + offset + right
    return ok


def attention_reference(q, k, v, *, causal=False, scale=None, layout="bhsd", window_size=(-1, -1), upcast=True):
    """Returns (out, lse) with out in q's dtype and layout, lse (B, Hq, Sq) float32. Differentiable."""
    if layout == "bshd":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    dtype = q.dtype
    hi = torch.float64 if q.device.type == "cpu" else torch.float32
    work = hi if upcast else torch.float32

    def rnd(x):  # the low reference rounds to the input dtype at each stage boundary
        return x if upcast else x.to(dtype).to(work)

    group = q.shape[1] // k.shape[1]
    qw, kw, vw = (t.to(work) for t in (q, k, v))
    kw, vw = kw.repeat_interleave(group, dim=1), vw.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = rnd(qw @ kw.transpose(-1, -2)) * scale
    mask = visible(q.shape[2], k.shape[2], causal, window_size, q.device)
    s = s.masked_fill(~mask, float("-inf"))
    if s.shape[-1] == 0:  # no keys at all: every row is fully masked
        m = s.new_full((*s.shape[:-1], 1), float("-inf"))
    else:
        m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    l = p.sum(dim=-1, keepdim=True)
    l_safe = torch.where(l > 0, l, torch.ones_like(l))  # rows with no visible key: out 0, lse -inf, no NaN
    p = rnd(p / l_safe)
    out = rnd(p @ vw)
    # lse: -inf for rows with no visible key; NaN where a NaN score made l NaN
    lse = torch.where(l > 0, m + torch.log(l_safe), torch.where(l.isnan(), l, torch.full_like(l, float("-inf"))))
    lse = lse.squeeze(-1)
    out = out.to(dtype)
    if layout == "bshd":
        out = out.transpose(1, 2)
    return out, lse.float()
