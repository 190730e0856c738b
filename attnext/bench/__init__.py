"""attnext's benchmark: `python -m attnext.bench --help`.

Checks attnext against the reference on every benchmarked config (at a small size), then times it
against torch's scaled_dot_product_attention in the same process, on the same inputs, calls
interleaved, and reports medians, FLOP rates and ratios (peer time / attnext time: > 1 means attnext
is faster). `--memory` measures extra peak memory instead.

Modules: configs (suites, shapes, FLOPs), check (correctness), timing (the timed runs),
memory (peak memory in fresh processes), report (tables, JSON, plot).
"""
