"""Correctness of attnext against attnext.reference, by FlashAttention's tolerance rule.

    max|out - ref_hi| <= 2 * max|ref_lowp - ref_hi| + 1e-5      (3x for the gradients)

ref_hi is the reference computed in float64 on CPU (float32 on GPU), ref_lowp the same computation
in the input dtype. Checks run at a small size so that they take seconds, before any timing.
"""

import time

import torch

import attnext
from attnext.reference import attention_reference

FLOOR = 1e-5
OUT_FACTOR = 2.0
GRAD_FACTOR = 3.0
SMALL_SEQLEN = 200  # not a multiple of any block size: the tails are checked too
SMALL_HEADS = 2
SMALL_SEQ_K = 1100  # decode: long enough for the split-KV path, not a multiple of a block size


def _max_abs_diff(a, b):
    return (a.detach().double() - b.detach().double()).abs().max().item()


def check_case(dtype, batch, heads, heads_kv, seq_q, seq_k, head_dim, causal, mode, device, seed=0):
    """Compares attnext with the reference on one case; returns a dict with the errors and `ok`."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    grad = mode in ("bwd", "fwdbwd")
    shape, kv_shape = (batch, heads, seq_q, head_dim), (batch, heads_kv, seq_k, head_dim)
    q, k, v = (torch.randn(s, generator=generator).to(device=device, dtype=dtype).requires_grad_(grad)
               for s in (shape, kv_shape, kv_shape))
    out = attnext.attention(q, k, v, causal=causal)
    ref_hi, _ = attention_reference(q, k, v, causal=causal, upcast=True)
    ref_lo, _ = attention_reference(q, k, v, causal=causal, upcast=False)
    names, outputs = ["out"], [(out, ref_hi, ref_lo, OUT_FACTOR)]
    if grad:
        dout = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
        grads = [torch.autograd.grad(o, (q, k, v), dout) for o in (out, ref_hi, ref_lo)]
        for i, name in enumerate(("dq", "dk", "dv")):
            names.append(name)
            outputs.append((grads[0][i], grads[1][i], grads[2][i], GRAD_FACTOR))
    errors = {}
    ok = True
    for name, (got, hi, lo, factor) in zip(names, outputs):
        err = _max_abs_diff(got, hi)
        tol = factor * _max_abs_diff(lo, hi) + FLOOR
        errors[name] = {"err": err, "tol": tol}
        ok = ok and err <= tol  # a NaN error fails too
    return {"dtype": str(dtype).replace("torch.", ""), "shape": list(shape), "kv_shape": list(kv_shape),
            "causal": causal, "mode": mode, "device": str(device), "ok": ok, "errors": errors}


def small_case(c):
    """(dtype, B, Hq, Hkv, Sq, Sk, D, causal, mode) of config `c` at a small size (GQA groups kept for decode);
    the backward alone is checked as forward + backward."""
    q_shape, kv_shape = c.q_shape, c.kv_shape
    mode = "fwdbwd" if c.mode == "bwd" else c.mode
    if q_shape[1:3] == kv_shape[1:3]:  # the same heads and length for queries and keys
        heads, seq = min(q_shape[1], SMALL_HEADS), min(q_shape[2], SMALL_SEQLEN)
        return (c.dtype, 1, heads, heads, seq, seq, q_shape[3], c.causal, mode)
    group = q_shape[1] // kv_shape[1]
    heads_kv = max(1, SMALL_HEADS * 2 // group)
    return (c.dtype, 1, heads_kv * group, heads_kv, q_shape[2], min(kv_shape[2], SMALL_SEQ_K), q_shape[3],
            c.causal, mode)


def small_cases(configs):
    """The distinct small cases that cover the benchmarked configs."""
    return list(dict.fromkeys(small_case(c) for c in configs))


def _case_text(dtype, shape, kv_shape, causal, mode):
    b, h, s, d = shape
    text = f"{b}x{h}x{s}x{d}"
    if kv_shape is not None and list(kv_shape) != list(shape):
        text += " kv {}x{}x{}x{}".format(*kv_shape)
    return f"{dtype:<8} {text} {'causal' if causal else 'full':<6} {mode:<6}"


def describe(result):
    """One line: pass/FAIL, the case, and its worst error relative to its tolerance."""
    case = _case_text(result["dtype"], result["shape"], result.get("kv_shape"), result["causal"], result["mode"])
    if "exception" in result:
        return f"FAIL  {case}  {result['exception']}"
    if result["ok"]:
        name, e = max(result["errors"].items(), key=lambda kv: kv[1]["err"] / kv[1]["tol"])
        return f"pass  {case}  worst {name}: err {e['err']:.2e} <= tol {e['tol']:.2e}"
    failed = [f"{name}: err {e['err']:.2e} > tol {e['tol']:.2e}"
              for name, e in result["errors"].items() if not e["err"] <= e["tol"]]
    return f"FAIL  {case}  " + "; ".join(failed)


def run_checks(configs, device, log):
    """Checks every case of `configs` at a small size; logs one line per case; returns (all_ok, results)."""
    start = time.perf_counter()
    results = []
    for case in small_cases(configs):
        try:
            result = check_case(*case, device=device)
        except Exception as exc:  # a kernel error is a failed check, reported with its message
            dtype, b, h, hkv, sq, sk, d, causal, mode = case
            result = {"dtype": str(dtype).replace("torch.", ""), "shape": [b, h, sq, d], "kv_shape": [b, hkv, sk, d],
                      "causal": causal, "mode": mode, "device": str(device), "ok": False, "errors": {},
                      "exception": f"{type(exc).__name__}: {exc}"}
        log(describe(result))
        results.append(result)
    all_ok = all(r["ok"] for r in results)
    log(f"correctness: {sum(r['ok'] for r in results)}/{len(results)} cases pass "
        f"({time.perf_counter() - start:.1f} s)")
    return all_ok, results
