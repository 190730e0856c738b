"""NaN and inf inputs give what the math gives: a NaN score (from a NaN in q, or in k at a key the row sees)
or a +inf one makes the row's out and lse NaN; a NaN in v reaches every row that sees its key. Rows with no
visible key keep out 0, lse -inf. Each kernel path: the prefill's rows and lanes forms, the bf16 pairs,
and the decode's dot and lanes forms with the key range split over threads."""

import pytest
import torch

import attnext
from attnext.reference import attention_reference
from helpers import DTYPES

# (Hq, Hkv, Sq, Sk, D): few rows (rows form), a long prefill (lanes form), Sq > Sk (bottom-right causal:
# rows without keys), one decode row on a key range split over threads, 4 and 16 decode rows per KV head
SHAPES = [(2, 2, 5, 37, 16), (2, 1, 200, 200, 64), (2, 2, 40, 9, 16), (2, 2, 1, 3000, 128), (8, 2, 1, 600, 64),
          (16, 2, 2, 600, 64)]
# (tensor, value) put into element 3 of q's last row, k's last key or v's first key (_poisoned). A -inf in q
# gives +inf scores wherever k's element 3 is negative.
CASES = [("q", float("nan")), ("k", float("nan")), ("v", float("nan")), ("k", float("inf")), ("q", float("-inf"))]


def _poisoned(shape, dtype, where, value):
    hq, hkv, sq, sk, d = shape
    q, k, v = torch.randn(1, hq, sq, d), torch.randn(1, hkv, sk, d), torch.randn(1, hkv, sk, d)
    q[..., 3] = q[..., 3].abs()  # a +inf in k's element 3 then gives +inf scores (not -inf ones, as a mask would)
    t = {"q": q, "k": k, "v": v}[where]
    t[0, 0, 0 if where == "v" else t.shape[2] - 1, 3] = value  # key 0 of v: every row sees it
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, "bottom_right"])
@pytest.mark.parametrize("where,value", CASES, ids=[f"{w}{v}" for w, v in CASES])
def test_nonfinite_inputs_match_the_reference(cpu_unit, dtype, shape, causal, where, value):
    torch.manual_seed(0)
    q, k, v = _poisoned(shape, dtype, where, value)
    out, lse = attnext.attention(q, k, v, causal=causal, return_lse=True)
    ref_out, ref_lse = attention_reference(q, k, v, causal=causal)
    assert ref_out.isnan().any()
    if causal and shape[2] > shape[3]:  # the first Sq - Sk rows see no key: out 0 (the dense reference's 0 · v
        empty = shape[2] - shape[3]     # is NaN where v is), lse -inf
        assert not out[0, :, :empty].any() and (lse[0, :, :empty] == float("-inf")).all()
        out, lse, ref_out, ref_lse = out[:, :, empty:], lse[:, :, empty:], ref_out[:, :, empty:], ref_lse[:, :, empty:]
    assert torch.equal(out.isnan(), ref_out.isnan())
    assert torch.equal(out.isinf(), ref_out.isinf())
    # lse: NaN where the reference's is NaN; a +inf score gives the reference +inf, attnext NaN
    assert torch.equal(lse.isfinite(), ref_lse.isfinite())
    assert lse[ref_lse.isnan()].isnan().all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_reaches_every_gradient(cpu_unit, dtype):
    """A NaN in one query row: that row's dq, and every dk and dv row (each key is seen by that row)."""
    torch.manual_seed(0)
    q, k, v = (t.requires_grad_() for t in _poisoned((2, 1, 40, 70, 32), dtype, "q", float("nan")))
    dq, dk, dv = torch.autograd.grad(attnext.attention(q, k, v), (q, k, v), torch.randn(1, 2, 40, 32).to(dtype))
    assert dq[0, 0, -1].isnan().all() and not dq[0, 0, :-1].isnan().any()
    assert dk.isnan().any(dim=-1).all() and dv.isnan().any(dim=-1).all()
