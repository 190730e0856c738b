"""`--calls`: the time of one call on one decode token, warm and cold, for attnext's three entry points and
torch SDPA.

Warm: calls of one entry point back to back. Cold: before each call the run reads a buffer larger than the
L3 cache (x.sum() over EVICT_MIB MiB), as a model's other layers do between two attention calls: the call's
Python, dispatcher and kernel code and its K/V then come from memory. The entry points take turns within
each round, so that the machine's drift reaches all of them alike.
"""

import statistics
import time

import torch
import torch.nn.functional as F

import attnext
from attnext.bench import configs, machine, report, timing

EVICT_MIB = 64
WARM_ROUNDS, RUN_LENGTH = 20, 10  # warm: 20 rounds of 10 timed calls back to back per entry point
COLD_ROUNDS = 50  # cold: 50 rounds of one timed call per entry point, each after the eviction
SHAPES = [(1, 32, 8, 1, 16, 128), (1, 32, 8, 1, 1024, 128)]  # B, Hq, Hkv, Sq, Sk, D: a GQA decode token
PEER = "torch sdpa"


def entry_points(q, k, v):
    """{name: call} for q, k, v in (B, H, S, D); flash_attn_func takes the same memory as (B, S, H, D) views."""
    qs, ks, vs = (t.transpose(1, 2) for t in (q, k, v))
    return {"attention": lambda: attnext.attention(q, k, v),
            "sdpa drop-in": lambda: attnext.scaled_dot_product_attention(q, k, v, enable_gqa=True),
            "flash_attn_func": lambda: attnext.flash_attn_func(qs, ks, vs),
            PEER: lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)}


def _time_calls(calls, rounds, run_length, before):
    """{name: median µs of one call}: in each round every entry point in turn makes run_length + 1 calls, the
    first untimed (it follows another entry point), each after before()."""
    samples = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            for i in range(run_length + 1):
                before()
                start = time.perf_counter()
                call()
                if i:
                    samples[name].append((time.perf_counter() - start) * 1e6)
    return {name: statistics.median(s) for name, s in samples.items()}


def measure(cfg, evict):
    """Rows of one configs.DecodeConfig: each entry point's warm and cold µs and torch SDPA's over it."""
    case = timing.Case(cfg, torch.device("cpu"))
    calls = entry_points(case.q, *case.kvs[0])
    with torch.inference_mode():
        for call in calls.values():
            call()
        warm = _time_calls(calls, WARM_ROUNDS, RUN_LENGTH, lambda: None)
        cold = _time_calls(calls, COLD_ROUNDS, 1, evict.sum)
    return [dict(dtype=cfg.dtype_name, batch=cfg.batch, heads=cfg.heads, heads_kv=cfg.heads_kv, seq_q=cfg.seq_q,
                 seq_k=cfg.seq_k, head_dim=cfg.head_dim, entry=name, threads=torch.get_num_threads(),
                 warm_us=warm[name], cold_us=cold[name], warm_ratio=warm[PEER] / warm[name],
                 cold_ratio=cold[PEER] / cold[name]) for name in calls]


def calls_mode(args, device, record, log):
    """--calls: every shape x dtype x thread count; returns the lines to print."""
    if device.type != "cpu":
        raise SystemExit(f"attnext.bench: --calls runs on the CPU, not on {device}")
    evict = machine.read_buffer(EVICT_MIB)
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for shape in SHAPES:
            for name in args.dtypes:
                cfg = configs.DecodeConfig(configs.DTYPES[name], *shape)
                log(f"calls: {cfg.label()}, {report.threads_text(threads)}")
                rows += measure(cfg, evict)
    record.update(calls=rows, calls_rule={"warm_rounds": WARM_ROUNDS, "run_length": RUN_LENGTH,
                                          "cold_rounds": COLD_ROUNDS, "evict_mib": EVICT_MIB})
    columns = ["dtype", "B", "Hq", "Hkv", "Sq", "Sk", "D", "threads", "entry point", "warm µs", "cold µs",
               "torch / this, warm", "torch / this, cold"]
    body = [[r["dtype"], r["batch"], r["heads"], r["heads_kv"], r["seq_q"], r["seq_k"], r["head_dim"], r["threads"],
             r["entry"], f"{r['warm_us']:.1f}", f"{r['cold_us']:.1f}", f"{r['warm_ratio']:.2f}",
             f"{r['cold_ratio']:.2f}"] for r in rows]
    return [f"one call under torch.inference_mode(): warm = median of {WARM_ROUNDS} rounds of {RUN_LENGTH} calls "
            f"back to back (after one untimed call); cold = median of {COLD_ROUNDS}, each after x.sum() over "
            f"{EVICT_MIB} MiB (the caches hold other data, as after a model's other layers); the entry points take "
            "turns in each round", "", report.table(columns, body)]
