"""The CPU acceptance targets of `--suite cpu`: which configs each one times, and its verdict per row.

Every target is judged on rows measured in the same run: attnext against torch SDPA (A/B interleaved,
medians), against the ceilings of bench.machine, or attnext at 1 thread against 2 threads.
"""

import dataclasses

import torch

from attnext.bench import configs

DECODE_SHAPES = [(1, 32, hkv, sq, sk, 128) for hkv in (32, 8) for sk in (1024, 8192, 32768) for sq in (1, 4)]
DECODE_FIELDS = "B,Hq,Hkv,Sq,Sk,D"
THREADS_SEQLEN = 4096
THREADS_MIN_CORES = 1.8  # the probe's cores' worth from which 2 threads are expected to give the speedup


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    text: str  # the criterion, in words
    dtypes: tuple
    modes: tuple
    causal: bool = False
    max_seqlen: int = None  # only shapes with S <= this are timed
    judged_from: int = 0  # rows with S < this are timed and shown, not judged
    min_ratio: float = None  # peer ms / attnext ms
    min_peak: float = None  # attnext GFLOP/s per thread / per-core FMA peak
    min_bandwidth: float = None  # KV bytes per second / memory read bandwidth at the same thread count
    min_speedup: float = None  # attnext at 1 thread / at 2 threads


TARGETS = {t.name: t for t in [
    Target("fwd-fp32", "fp32 forward: >= 1.2x torch for S >= 1024, and >= 75% of the per-core FMA peak "
           "(GFLOP/s per thread)", ("fp32",), ("fwd",), judged_from=1024, min_ratio=1.2, min_peak=0.75),
    Target("causal-fwd", "causal forward at S <= 1024: >= 1.6x torch", ("fp32", "bf16", "fp16"), ("fwd",),
           causal=True, max_seqlen=1024, min_ratio=1.6),
    Target("fwdbwd-fp32", "fp32 forward+backward: >= 1.2x torch", ("fp32",), ("fwdbwd",), min_ratio=1.2),
    Target("fwd-lowp", "bf16 and fp16 forward: >= 1.2x torch", ("bf16", "fp16"), ("fwd",), min_ratio=1.2),
    Target("fwdbwd-lowp", "bf16 and fp16 forward+backward: >= 4x torch", ("bf16", "fp16"), ("fwdbwd",),
           min_ratio=4.0),
    Target("decode", "decode (Sq 1 and 4, Sk 1k..32k, 32 query heads on 32 or 8 KV heads, D=128, no mask): "
           "KV bytes read per second >= 80% of the memory read bandwidth at the same thread count",
           ("fp32", "bf16"), ("fwd",), min_bandwidth=0.8),
    Target("threads", f"S = {THREADS_SEQLEN}: attnext at 2 threads >= 1.8x faster than at 1, when the probe "
           f"finds >= {THREADS_MIN_CORES} cores' worth", ("fp32",), ("fwd", "fwdbwd"), min_speedup=1.8),
]}


def select(spec):
    """--targets "a,b": the named targets, in the table's order (all when `spec` is empty)."""
    if not spec:
        return list(TARGETS.values())
    names = configs.parse_list(spec, list(TARGETS), "target")
    return [t for t in TARGETS.values() if t.name in names]


def build(target, shapes, decode_shapes, dtypes, modes, causals, decode_layout="bhsd"):
    """The configs of `target` within the run's filters (dtypes as short names: fp32, bf16, fp16); decode
    configs with their K/V laid out as `decode_layout`."""
    kept_dtypes = [d for d in target.dtypes if d in dtypes]
    kept_modes = [m for m in target.modes if m in modes]
    if target.causal not in causals:
        return []
    if target.name == "decode":
        return [configs.DecodeConfig(configs.DTYPES[d], *shape, kv_layout=decode_layout) for d in kept_dtypes
                for shape in decode_shapes if "fwd" in kept_modes]
    if target.name == "threads":
        shapes = [s for s in shapes if s[2] == THREADS_SEQLEN]
    if target.max_seqlen is not None:
        shapes = [s for s in shapes if s[2] <= target.max_seqlen]
    return configs.build_configs(shapes, kept_dtypes, kept_modes, [target.causal])


def verdict(target, row):
    """("pass" | "FAIL" | "not judged" | "inconclusive", reason) of one row against `target`.

    A row timed while other processes took CPU time (row["disturbed"]) keeps its verdict with a note, except
    a failed speedup, which is then inconclusive: the two cores it needs were not there.
    """
    busy = f"others used {row['other_load']:.2f} cores" if row.get("disturbed") else ""
    if target.judged_from and row["seqlen"] < target.judged_from:
        return "not judged", f"S < {target.judged_from}"
    if target.min_speedup is not None:
        if row["speedup"] >= target.min_speedup:
            return "pass", busy
        if row["cores_worth"] < THREADS_MIN_CORES or busy:
            return "inconclusive", busy or f"probe: {row['cores_worth']:.2f} cores' worth"
        return "FAIL", f"speedup {row['speedup']:.2f} < {target.min_speedup}"
    failed = []
    if target.min_ratio is not None and not row["ratio"] >= target.min_ratio:
        failed.append(f"ratio < {target.min_ratio}")
    if target.min_peak is not None and not row["peak_fraction"] >= target.min_peak:
        failed.append(f"< {target.min_peak:.0%} of peak")
    if target.min_bandwidth is not None and not row["bandwidth_fraction"] >= target.min_bandwidth:
        cap = row.get("arithmetic_cap_fraction")
        capped = f" (the FMA peak allows {cap:.0%})" if cap is not None and cap < target.min_bandwidth else ""
        failed.append(f"< {target.min_bandwidth:.0%} of bandwidth{capped}")
    return ("FAIL" if failed else "pass"), ", ".join(failed + ([busy] if busy else []))


def arithmetic_cap(cfg, threads, bandwidth, ceil):
    """The most of `bandwidth` (GB/s) a decode config can read when its arithmetic runs at the FMA peak of
    `threads` cores: 2 products of 2 flops per query row, key and column, on bf16 at
    ceil["bf16_products_per_lane"] products per lane. Below 1 the row is bound by the arithmetic, not the
    memory (16 query rows per K/V row: 8 flops per fp32 byte)."""
    per_lane = ceil.get("bf16_products_per_lane", 1) if cfg.dtype == torch.bfloat16 else 1
    peak_gflops = threads * ceil["fma_peak_gflops"] * per_lane
    return min(1.0, cfg.kv_bytes() / cfg.flops() * peak_gflops / bandwidth)


def add_ceiling_fields(row, cfg, ceil):
    """Adds to a timing row what its target needs from the ceilings: % of FMA peak, or KV GB/s against the
    mean of the bandwidth probes beside the row (the header's where the row has none), with the share of
    that bandwidth the FMA peak allows, and the share of it read by the back-to-back calls where the row has
    them."""
    if isinstance(cfg, configs.DecodeConfig):
        kv = cfg.kv_bytes()
        beside = [row.get("bandwidth_before_gbs"), row.get("bandwidth_after_gbs")]
        if None in beside:
            bandwidth = ceil["bandwidth_gbs"].get(row["threads"])
        else:
            bandwidth = sum(beside) / 2
        row["bandwidth_gbs"] = bandwidth

        def gbs(ms):
            return kv / (ms * 1e-3) / 1e9

        def share(rate):
            return rate / bandwidth if bandwidth else float("nan")

        row.update(heads_kv=cfg.heads_kv, seq_q=cfg.seq_q, seq_k=cfg.seq_k, kv_layout=cfg.kv_layout, kv_bytes=kv,
                   attnext_kv_gbs=gbs(row["attnext_ms"]), peer_kv_gbs=gbs(row["peer_ms"]))
        row["bandwidth_fraction"] = share(row["attnext_kv_gbs"])
        if row.get("attnext_again_ms") is not None:  # not judged: see timing.measure(again=True)
            row["attnext_again_kv_gbs"] = gbs(row["attnext_again_ms"])
            row["bandwidth_fraction_again"] = share(row["attnext_again_kv_gbs"])
        row["arithmetic_cap_fraction"] = arithmetic_cap(cfg, row["threads"], bandwidth, ceil) if bandwidth else None
    else:
        row["peak_fraction"] = row["attnext_rate"] / row["threads"] / ceil["fma_peak_gflops"]
    return row

