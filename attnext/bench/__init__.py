"""attnext's benchmark: `python -m attnext.bench --help`.

Checks attnext against the reference on every benchmarked config (at a small size), then times it
against torch's scaled_dot_product_attention in the same process, on the same inputs, calls
interleaved, and reports medians, FLOP rates and ratios (peer time / attnext time: > 1 means attnext
is faster). `--memory` measures extra peak memory instead. `--suite cpu` judges the CPU acceptance
targets, each row pass or fail, against ratios and against ceilings measured in the same run.

Modules: configs (suites, shapes, FLOPs), check (correctness), timing (the timed runs),
memory (peak memory in fresh processes), report (tables, JSON, plot), console (progress);
for --suite cpu: targets (what each target times and how a row is judged), machine (FMA peak,
memory bandwidth, two-core probe, load from other processes), cpu_suite (the run),
target_report (its tables and plot).
"""
