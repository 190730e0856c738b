"""`--suite cpu`: the CPU acceptance targets of bench.targets, each row timed against torch SDPA in the
same run (A/B interleaved, medians) and judged against the ceilings of bench.machine measured in the
same run; the thread-scaling target times attnext at 1 and 2 threads interleaved, between two probes
of how many cores' worth the two vCPUs give at that moment.
"""

import dataclasses
import gc
import statistics

import torch

from attnext.bench import configs, machine, report, targets, target_report, timing
from attnext.bench.console import Progress

SLOW_PEER_MS = 3000.0  # a config whose first torch call takes longer is timed SLOW_REPS times
SLOW_REPS = 5
PEER = "sdpa"
COLD_KV_BYTES = 128 * 1024 * 1024  # decode: K/V copies used in turn, well above the L3 cache (32 MiB here)
BESIDE_RUNS = 5  # x.sum() passes of the bandwidth probe before and after each decode row


def plan(args):
    """[(target, configs)] for the targets and filters of `args`."""
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    return [(t, targets.build(t, args.shape_list, args.decode_shape_list, args.dtypes, args.modes, causals,
                              args.decode_layout))
            for t in targets.select(args.targets)]


def all_configs(the_plan):
    """The distinct configs of a plan, for the correctness check."""
    return list(dict.fromkeys(c for _, cfgs in the_plan for c in cfgs))


def time_row(target, cfg, threads, args, device, ceil):
    """attnext against torch SDPA on one config: a timing row with the target's fields and verdict."""
    slow = SLOW_PEER_MS if args.reps > SLOW_REPS else None
    decode = isinstance(cfg, configs.DecodeConfig)
    cold = COLD_KV_BYTES if decode else 0
    # Decode rows are judged against the read bandwidth probed just before and after them: it moves by
    # 20-30% within a run, more than the margin of many rows.
    before = machine.read_bandwidth(threads, runs=BESIDE_RUNS) if decode else None
    with machine.OtherLoad() as load:
        timings, missing = timing.measure(cfg, device, args.reps, args.warmup, slow, SLOW_REPS, cold, again=decode)
    after = machine.read_bandwidth(threads, runs=BESIDE_RUNS) if decode else None
    if PEER not in timings:
        raise RuntimeError(f"attnext.bench: torch SDPA cannot run {cfg.label()}: {missing.get(PEER)}")
    row = timing.result_row(cfg, device, threads, PEER, timings["attnext"], timings[PEER])
    row.update(target=target.name, other_load=load.cores, disturbed=load.disturbed)
    if decode:
        again = timings[timing.AGAIN]
        row.update(bandwidth_before_gbs=before, bandwidth_after_gbs=after, attnext_again_ms=again["median_ms"],
                   attnext_again_samples_ms=again["samples_ms"])
    targets.add_ceiling_fields(row, cfg, ceil)
    row["result"], row["reason"] = targets.verdict(target, row)
    return row


def measure_scaling(cfg, device, reps, warmup, counts=(1, 2)):
    """attnext alone at each thread count in `counts`, interleaved; {threads: samples in ms}."""
    case = timing.Case(cfg, device)
    call = timing.attnext_call(cfg.causal)
    previous = torch.get_num_threads()
    samples = {n: [] for n in counts}
    gc.collect()
    gc_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(max(warmup, 1) + reps):
            for n in counts:
                torch.set_num_threads(n)
                ms = case.run(call)
                if i >= max(warmup, 1):
                    samples[n].append(ms)
    finally:
        torch.set_num_threads(previous)
        if gc_enabled:
            gc.enable()
    return samples


def scaling_row(target, cfg, args, device):
    """The thread-scaling row of one config: 1- and 2-thread medians, with the two-core probe before and after."""
    before = machine.cores_worth()
    with machine.OtherLoad() as load:
        samples = measure_scaling(cfg, device, args.reps, args.warmup)
    after = machine.cores_worth()
    one, two = statistics.median(samples[1]), statistics.median(samples[2])
    row = dict(target=target.name, device=device.type, dtype=cfg.dtype_name, batch=cfg.batch, heads=cfg.heads,
               seqlen=cfg.seqlen, head_dim=cfg.head_dim, causal=cfg.causal, mode=cfg.mode, threads="1 vs 2",
               reps=args.reps, ms_1=one, ms_2=two, speedup=one / two, cores_before=before, cores_after=after,
               cores_worth=(before + after) / 2, other_load=load.cores, disturbed=load.disturbed,
               samples_ms_1=samples[1], samples_ms_2=samples[2])
    row["result"], row["reason"] = targets.verdict(target, row)
    return row


def _step_text(row):
    if row["target"] == "threads":
        return (f"1 thread {row['ms_1']:.2f} ms, 2 threads {row['ms_2']:.2f} ms: {row['speedup']:.2f}x "
                f"({row['cores_worth']:.2f} cores' worth): {row['result']}")
    return (f"{row['threads']} thread(s): attnext {report.ms_text(row['attnext_ms'])} ms, sdpa "
            f"{report.ms_text(row['peer_ms'])} ms, ratio {row['ratio']:.2f}: {row['result']}")


def run(the_plan, args, device, ceil, record):
    """Times every row of the plan at each thread count, then the thread scaling; returns the lines to print."""
    timed = [(t, c) for t, cfgs in the_plan if t.name != "threads" for c in cfgs]
    scaling = [(t, c) for t, cfgs in the_plan if t.name == "threads" for c in cfgs]
    notes = []
    if scaling and not {1, 2} <= set(args.threads):
        notes.append("threads: not run (it needs --threads to include 1 and 2)")
        scaling = []
    rows = []
    progress = Progress(len(timed) * len(args.threads) + len(scaling))
    try:
        for threads in args.threads:
            torch.set_num_threads(threads)
            for target, cfg in timed:
                rows.append(time_row(target, cfg, threads, args, device, ceil))
                progress.step(f"{target.name}: {cfg.label()}, {_step_text(rows[-1])}",
                              f"{target.name} {cfg.label()} {threads}t: {rows[-1]['result']}")
        for target, cfg in scaling:
            rows.append(scaling_row(target, cfg, args, device))
            progress.step(f"threads: {cfg.label()}, {_step_text(rows[-1])}",
                          f"threads {cfg.label()}: {rows[-1]['result']}")
    finally:
        progress.close()
    end = machine.ceilings(args.threads)
    record.update(suite="cpu", targets=[dataclasses.asdict(t) for t, _ in the_plan], ceilings=ceil,
                  ceilings_at_end=end, rows=rows, reps=args.reps, warmup=args.warmup, threads=args.threads,
                  slow_rule={"peer_first_call_ms": SLOW_PEER_MS, "reps": SLOW_REPS},
                  decode_cold_kv_bytes=COLD_KV_BYTES, decode_bandwidth_beside_runs=BESIDE_RUNS)
    lines = target_report.report_lines(the_plan, rows, end, args.reps, args.warmup, SLOW_REPS, notes)
    if args.plot and rows:
        target_report.write_plot(args.plot, the_plan, rows)
    return lines


def validate(args):
    """Parses the cpu suite's own options into `args` (raises ValueError on a bad one)."""
    targets.select(args.targets)
    args.decode_shape_list = configs.select_shapes(args.decode_shapes, targets.DECODE_SHAPES,
                                                   targets.DECODE_FIELDS, "--decode-shapes")
