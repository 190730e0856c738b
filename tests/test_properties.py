"""Property test: random small problems (batch, heads, GQA ratio, sizes (Sq may be 0), head dim, masks, windows,
layout, dtype, CPU unit) meet the rule for out, lse and gradients."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnext import _ops
from helpers import DTYPES, check_attention, make_qkv


RUNNABLE_UNITS = _ops.cpu_units_runnable()


@st.composite
def problems(draw):
    causal = draw(st.sampled_from([False, "top_left", "bottom_right"]))
    right = st.sampled_from([-1, 0]) if causal else st.integers(-1, 24)
    window = draw(st.one_of(st.just((-1, -1)), st.tuples(st.integers(-1, 24), right)))
    return dict(
        b=draw(st.integers(1, 2)),
        hkv=draw(st.integers(1, 3)),
        group=draw(st.sampled_from([1, 2, 3, 4, 8])),
        sq=draw(st.integers(0, 90)),
        sk=draw(st.integers(1, 90)),  # Sk = 0: see test_empty.py
        d=draw(st.one_of(st.integers(1, 80), st.sampled_from([96, 128, 160, 256]))),
        dtype=draw(st.sampled_from(DTYPES)),
        layout=draw(st.sampled_from(["bhsd", "bshd"])),
        causal=causal,
        window=window,
        scale=draw(st.one_of(st.none(), st.floats(0.01, 2.0))),
        dlse=draw(st.booleans()),
        unit=draw(st.sampled_from(RUNNABLE_UNITS)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(deadline=None, max_examples=25)
@given(problems())
def test_random_problems_meet_the_rule(p):
    torch.manual_seed(p["seed"])
    q, k, v = make_qkv(p["b"], p["hkv"] * p["group"], p["hkv"], p["sq"], p["sk"], p["d"], p["dtype"], p["layout"])
    previous = _ops.set_cpu_unit(p["unit"])
    try:
        check_attention(q, k, v, causal=p["causal"], window_size=p["window"], scale=p["scale"],
                        layout=p["layout"], dlse=p["dlse"], what=f"{p['unit']}")
    finally:
        _ops.set_cpu_unit(previous)
