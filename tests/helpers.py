"""Shared test helpers: input construction and FlashAttention's tolerance rule against attnext.reference.

The rule: max|got - ref_hi| <= factor * max|ref_lowp - ref_hi| + floor, with factor 2 for outputs and LSE and
3 for gradients. ref_hi is the float64 reference, ref_lowp the same-dtype one (attention_reference(upcast=False)).
Gradients compare autograd of attnext with autograd of ref_hi; their band also counts the rounding of the stored
output that every FlashAttention backward reads (see references()).
"""

import torch
import torch.nn.functional as F

import attnext
from attnext.reference import attention_reference, visible

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The floor only covers float32 inputs, where ref_lowp equals ref_hi up to float32 rounding and the band
# 2 * max|ref_lowp - ref_hi| can be tighter than a differently ordered float32 reduction. float32 has a
# unit roundoff of 6e-8; a dot product or a row sum over n <= ~1000 terms in another order moves the result
# by about sqrt(n) * 6e-8 ~ 2e-6 relative, and the exp/log of the softmax add a few ulps of |score| on top.
# 1e-5 relative to the largest reference value is ~5x that. Gradients chain two more reductions (dP = dO Vᵀ,
# then dS K or dSᵀ Q over up to ~1000 rows), hence 5e-5, relative to the largest of dq, dk and dv together:
# a gradient that is 0 in exact arithmetic (dk with a single key, where dS = P (dP - Delta) vanishes) is the
# cancellation of terms as large as the other gradients, which ref_lowp may reproduce exactly (band 0).
# For 16-bit inputs the band is ~1e-3 and the floor is negligible.
OUT_FLOOR = 1e-5
GRAD_FLOOR = 5e-5


def floor_for(refs, rel):
    """rel times the largest finite |value| of refs (a tensor or several; at least 1)."""
    peak = 0.0
    for ref in refs if isinstance(refs, (tuple, list)) else (refs,):
        ref = ref.detach().double()
        finite = ref[torch.isfinite(ref)]
        if finite.numel():
            peak = max(peak, finite.abs().max().item())
    return rel * max(1.0, peak)


def assert_close_by_rule(got, hi, lo, factor, floor, what):
    """max|got - hi| <= factor * max|lo - hi| + floor over finite entries; non-finite entries (an LSE of -inf
    for a row without visible keys) must match exactly; got must hold no NaN. lo may be a tuple of
    low-precision results, the band being the widest of them."""
    los = lo if isinstance(lo, (tuple, list)) else (lo,)
    got, hi = (t.detach().to("cpu", torch.float64) for t in (got, hi))
    los = [t.detach().to("cpu", torch.float64) for t in los]
    assert got.shape == hi.shape and all(t.shape == hi.shape for t in los), \
        f"{what}: shapes {tuple(got.shape)}, {tuple(hi.shape)}, {[tuple(t.shape) for t in los]}"
    assert not torch.isnan(got).any(), f"{what}: NaN in result"
    finite = torch.isfinite(hi)
    assert torch.equal(torch.isfinite(got), finite), f"{what}: non-finite entries differ from the reference"
    assert torch.equal(got[~finite], hi[~finite]), f"{what}: infinite entries differ from the reference"
    if not finite.any():
        return
    err = (got - hi)[finite].abs().max().item()
    band = max((t - hi)[finite].abs().max().item() for t in los)
    bound = factor * band + floor
    assert err <= bound, (f"{what}: max|got - ref_hi| = {err:.3e} > {factor} * max|ref_lowp - ref_hi| "
                          f"({band:.3e}) + floor {floor:.1e}")


def make_qkv(b, hq, hkv, sq, sk, d, dtype=torch.float32, layout="bhsd"):
    """Random q (B, Hq, Sq, D) and k, v (B, Hkv, Sk, D) in the given layout (contiguous)."""
    def mk(h, s):
        shape = (b, h, s, d) if layout == "bhsd" else (b, s, h, d)
        return torch.randn(shape).to(dtype)

    return mk(hq, sq), mk(hkv, sk), mk(hkv, sk)


def _leaves(tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


def references(q, k, v, dout=None, dlse=None, **kw):
    """(hi, lo) dicts with "out", "lse" and, if dout is given, "dq", "dk", "dv" from autograd of
    sum(out * dout) (+ sum(lse * dlse)). hi runs on float64 leaves so its gradients are not rounded.

    lo's gradients are a pair (ref_lowp's, stored-output's): ref_lowp's autograd never reads the forward's
    output, but a FlashAttention backward (attnext's, torch's CPU flash kernel, FlashAttention's) must: it
    forms Delta_i = sum_d dO_id * O_id from O as stored in the input dtype, so O's rounding enters dS = P (dP -
    Delta) and, on tensors of a few dozen entries, can exceed 3x ref_lowp's band alone (torch's own CPU flash
    kernel exceeds it more often than attnext does). The stored-output gradient is ref_hi's gradient with that
    Delta: since d lse_i / d s_ij = P_ij, it is autograd of the same loss minus sum_i delta_i * lse_i, where
    delta_i = sum_d dO_id * (round(O_id) - O_id)."""
    kw = {key: value for key, value in kw.items() if key != "deterministic"}  # a kernel option, not semantics
    result = []
    for upcast in (True, False):
        leaves = _leaves((q, k, v), torch.float64 if upcast else None)
        out, lse = attention_reference(*leaves, upcast=upcast, **kw)
        r = {"out": out.detach(), "lse": lse.detach()}
        if dout is not None:
            dlse_total = torch.zeros_like(lse) if dlse is None else dlse.to(lse.dtype)
            finite_lse = torch.where(torch.isfinite(lse), lse, 0)
            loss = (out * dout.to(out.dtype)).sum() + (finite_lse * dlse_total).sum()
            r["dq"], r["dk"], r["dv"] = torch.autograd.grad(loss, leaves, retain_graph=upcast)
            if upcast:
                stored = out.detach().to(q.dtype).to(out.dtype)
                delta = (dout.to(out.dtype) * (stored - out.detach())).sum(-1)
                if kw.get("layout") == "bshd":
                    delta = delta.transpose(1, 2)
                loss = loss - (finite_lse * delta.to(lse.dtype)).sum()
                r["stored"] = torch.autograd.grad(loss, leaves)
        result.append(r)
    hi, lo = result
    if dout is not None:
        for i, name in enumerate(("dq", "dk", "dv")):
            lo[name] = (lo[name], hi["stored"][i])
    return hi, lo


def run_attnext(q, k, v, dout=None, dlse=None, **kw):
    """attnext.attention's out, lse and (if dout is given) gradients, as a dict like references()."""
    leaves = _leaves((q, k, v))
    out, lse = attnext.attention(*leaves, return_lse=True, **kw)
    r = {"out": out.detach(), "lse": lse.detach()}
    if dout is not None:
        loss = (out * dout).sum()
        if dlse is not None:
            loss = loss + (torch.where(torch.isfinite(lse), lse, 0) * dlse).sum()
        r["dq"], r["dk"], r["dv"] = torch.autograd.grad(loss, leaves)
    return r


def check_attention(q, k, v, *, grads=True, dlse=False, what="", **kw):
    """attnext.attention(q, k, v, **kw) against the references by the rule: out, lse and, if grads, dq/dk/dv.
    Returns attnext's results."""
    dout = torch.randn_like(q) if grads else None
    dl = None
    if dlse:
        b, h, s = (q.shape[0], q.shape[2], q.shape[1]) if kw.get("layout") == "bshd" else q.shape[:3]
        dl = torch.randn(b, h, s, device=q.device)
    got = run_attnext(q, k, v, dout, dl, **kw)
    cpu = [None if t is None else t.cpu() for t in (q, k, v, dout, dl)]
    hi, lo = references(*cpu, **kw)  # on the CPU, in float64, whatever q's device
    tag = f"{what} {tuple(q.shape)} {tuple(k.shape)} {q.dtype} {kw}"
    assert got["out"].shape == q.shape and got["out"].dtype == q.dtype, tag
    assert got["lse"].dtype == torch.float32, tag
    for name in ("out", "lse"):
        assert_close_by_rule(got[name], hi[name], lo[name], 2, floor_for(hi[name], OUT_FLOOR), f"{name} {tag}")
    if grads:
        floor = floor_for([hi["dq"], hi["dk"], hi["dv"]], GRAD_FLOOR)
        for name, t in zip(("dq", "dk", "dv"), (q, k, v)):
            assert got[name].shape == t.shape and got[name].dtype == t.dtype, f"{name} {tag}"
            assert_close_by_rule(got[name], hi[name], lo[name], 3, floor, f"{name} {tag}")
    return got


def _sdpa_grads(fn, q, k, v, dout, dtype=None, **kw):
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, **kw)
    return out.detach(), torch.autograd.grad(out, leaves, dout.to(out.dtype))


def check_against_torch_sdpa(q, k, v, **kw):
    """attnext.scaled_dot_product_attention by the rule with torch's SDPA as the reference: float64 torch is
    ref_hi, same-dtype torch is ref_lowp; forward and gradients."""
    dout = torch.randn_like(q)
    got, got_g = _sdpa_grads(attnext.scaled_dot_product_attention, q, k, v, dout, **kw)
    hi, hi_g = _sdpa_grads(F.scaled_dot_product_attention, q, k, v, dout, torch.float64, **kw)
    lo, lo_g = _sdpa_grads(F.scaled_dot_product_attention, q, k, v, dout, **kw)
    assert got.shape == lo.shape and got.dtype == lo.dtype
    assert_close_by_rule(got, hi, lo, 2, floor_for(hi, OUT_FLOOR), f"out {kw}")
    floor = floor_for(list(hi_g), GRAD_FLOOR)
    for name, a, b, c in zip(("dq", "dk", "dv"), got_g, hi_g, lo_g):
        assert_close_by_rule(a, b, c, 3, floor, f"{name} {kw}")


def empty_rows(sq, sk, causal=False, window_size=(-1, -1)):
    """Boolean (Sq,): query rows that see no key."""
    return ~visible(sq, sk, causal, window_size).any(dim=1)
