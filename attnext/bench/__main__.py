"""`python -m attnext.bench`: correctness check, then attnext against torch SDPA, or `--memory`, or `--calls`."""

import argparse
import datetime
import platform
import shlex
import subprocess
import sys
import textwrap
import time

import torch

import attnext
from attnext import _ops, info
from attnext.bench import calls, check, configs, cpu_suite, machine, memory, report, targets, timing
from attnext.bench.console import Progress, log

DESCRIPTION = ("Checks attnext against its reference on each benchmarked config (small sizes), then times it "
               "against torch.nn.functional.scaled_dot_product_attention in the same run; --memory measures "
               "extra peak memory instead, --calls the time of one decode call, warm and cold.")
EPILOG = """\
suites:
  quick    {quick}
  anchors  {anchors}
  cpu      {cpu}
  gpu      {gpu}

--suite cpu runs the CPU acceptance targets on the CPU. Every row is timed against torch SDPA in the same
run and gets a result (pass, FAIL, not judged, inconclusive), judged against ratios and against ceilings
measured at the start of the run and printed in the header: the per-core FMA peak
(torch.ops.attnext.cpu_fma_peak, best of 3 runs of ~0.3 s), the memory read bandwidth (x.sum() over
256 MiB float32, median of 7) at each thread count, and how many cores' worth two threads get (the same
FMA loop on 1 Python thread, then on 2 at once). Decode rows are judged against the mean of two
bandwidth probes (median of 5) run just before and after each row, the thread rows against the cores'
worth probed just before and after them. The targets:
{targets}
  Run it with --threads 1,2 (the threads target needs both). --targets a,b picks targets; --dtypes,
  --modes, --causal and --shapes filter their configs, and --decode-shapes "B,Hq,Hkv,Sq,Sk,D;..." does
  for decode what --shapes does for the others. A config whose first torch call takes over 3 s is
  timed 5 times (see the reps column). Sq = Sk and causal top-left except in decode (no mask). The
  column "others" is the CPU time other processes used while a row was timed (/proc/stat), in cores.

--shapes "B,H,S,D;...": concrete shapes replace the suite's; a field "*" matches any, so that
"*,*,4096,*" keeps the suite's shapes with S=4096. Causal is top-left aligned (Sq == Sk here).
FLOPs: forward 4*B*H*S*S*D over the visible pairs (about half when causal), backward 2.5x, forward+backward 3.5x.
Modes: fwd; bwd, the backward alone (its forward runs untimed before each timed backward); fwdbwd.
On CUDA the peers are torch SDPA with each backend forced (flash, cudnn, efficient), timed with CUDA events.
--calls times one call of attention, the SDPA drop-in, flash_attn_func and torch SDPA on a decode token
(32 query heads on 8, 16 and 1024 keys, D = 128, on the CPU, --dtypes and --threads as given): warm, back to
back, and cold, each call after reading 64 MiB, as after a model's other layers.
ratio = peer ms / attnext ms: > 1 means attnext is faster.

examples:
  python -m attnext.bench
  python -m attnext.bench --suite anchors --threads 1,2 --json benchmarks/results/cpu.json
  python -m attnext.bench --suite anchors --shapes "*,*,4096,*" --dtypes float32 --modes fwd
  python -m attnext.bench --suite cpu --threads 1,2 --json benchmarks/results/cpu-targets.json \\
      --markdown benchmarks/results/cpu-targets.md --plot benchmarks/results/cpu-targets.png
  python -m attnext.bench --suite cpu --targets decode,threads --threads 1,2
  python -m attnext.bench --memory --memory-shape 1,8,4096,64
  python -m attnext.bench --calls --dtypes bfloat16 --threads 1,2 --markdown calls.md
  python -m attnext.bench --suite gpu --slow-ms 20 --slow-reps 5 --json gpu.json --markdown gpu.md
""".format(**{name: suite[2] for name, suite in configs.SUITES.items()},
           targets="\n".join(textwrap.fill(f"{t.name:<12} {t.text}", 104, initial_indent="  ",
                                           subsequent_indent=" " * 15) for t in targets.TARGETS.values()))


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m attnext.bench", description=DESCRIPTION,
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=list(configs.SUITES), default="quick", help="shape set (default: quick)")
    p.add_argument("--shapes", help='"B,H,S,D;..." to replace or filter the suite\'s shapes (see below)')
    p.add_argument("--device", help="cpu or cuda (default: cuda if a GPU and attnext's CUDA module are there)")
    p.add_argument("--dtypes", help="comma-separated (default: float32,bfloat16; the cpu suite: "
                   "float32,bfloat16,float16; the gpu suite: bfloat16)")
    p.add_argument("--modes", help="fwd, bwd (the backward alone, its forward untimed) and/or fwdbwd "
                   "(default: fwd,fwdbwd; the gpu suite: fwd,bwd)")
    p.add_argument("--causal", choices=("both", "yes", "no"), default="both", help="default: both")
    p.add_argument("--threads", default="1", help="torch threads, a list runs each: 1,2 (default: 1)")
    p.add_argument("--reps", type=int, default=9, help="timed runs per config, median reported (default: 9)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per config first (default: 2)")
    p.add_argument("--slow-ms", type=float, help="a config whose first call takes longer than this many ms is "
                   "timed --slow-reps times after one warm-up (default: off)")
    p.add_argument("--slow-reps", type=int, default=3, help="timed runs of such a slow config (default: 3)")
    p.add_argument("--time-limit", type=float, metavar="SECONDS", help="time no new config after this many "
                   "seconds from the start; the configs left are listed as skipped (default: none)")
    p.add_argument("--targets", help="the cpu suite: comma-separated target names (default: all; see below)")
    p.add_argument("--decode-shapes", help='the cpu suite: "B,Hq,Hkv,Sq,Sk,D;..." for decode, as --shapes')
    p.add_argument("--decode-layout", choices=("bhsd", "bshd"), default="bhsd",
                   help="the cpu suite: how the decode's K/V lie in memory; bshd = (batch, key, head, dim), "
                   "FlashAttention's KV cache, passed as BHSD views (default: bhsd)")
    p.add_argument("--skip-check", action="store_true", help="skip the correctness check")
    p.add_argument("--memory", action="store_true",
                   help="measure extra peak memory of attnext and SDPA instead of timing")
    p.add_argument("--memory-shape", default="1,8,4096,64", help="B,H,S,D for --memory (default: 1,8,4096,64)")
    p.add_argument("--memory-dtype", default="float32", help="dtype for --memory (default: float32)")
    p.add_argument("--calls", action="store_true",
                   help="time one decode call of each entry point, warm and cold, instead (see below)")
    p.add_argument("--json", metavar="FILE", help="save all numbers, the machine and the command line as JSON")
    p.add_argument("--markdown", metavar="FILE", help="save the header and table as markdown")
    p.add_argument("--plot", metavar="FILE.png", help="save a bar chart of the FLOP rates (matplotlib)")
    args = p.parse_args(argv)
    try:
        modes = args.modes or ",".join(configs.SUITE_MODES.get(args.suite, configs.DEFAULT_MODES))
        args.modes = configs.parse_list(modes, configs.MODES, "mode")
        dtypes = args.dtypes or ",".join(configs.SUITES[args.suite][1])
        names = configs.parse_list(dtypes, list(configs.DTYPES), "dtype")
        args.dtypes = list(dict.fromkeys(configs.DTYPE_NAMES[configs.DTYPES[n]] for n in names))
        args.threads = configs.parse_ints(args.threads, "--threads")
        args.shape_list = configs.select_shapes(args.shapes, configs.SUITES[args.suite][0])
        args.memory_shape = configs.parse_shape(args.memory_shape)
        if None in args.memory_shape:
            raise ValueError("attnext.bench: --memory-shape takes integers only")
        configs.parse_list(args.memory_dtype, list(configs.DTYPES), "dtype")
        if args.suite == "cpu":
            cpu_suite.validate(args)
        elif args.targets or args.decode_shapes or args.decode_layout != "bhsd":
            raise ValueError("attnext.bench: --targets, --decode-shapes and --decode-layout belong to --suite cpu")
    except ValueError as exc:
        p.error(str(exc).removeprefix("attnext.bench: "))
    if args.reps < 1 or args.warmup < 0 or args.slow_reps < 1:
        p.error("--reps and --slow-reps must be >= 1 and --warmup >= 0")
    if (args.time_limit is not None and args.time_limit <= 0) or (args.slow_ms is not None and args.slow_ms <= 0):
        p.error("--time-limit and --slow-ms must be > 0")
    return args


def pick_device(name):
    if name:
        device = torch.device(name)
        if device.type not in ("cpu", "cuda"):
            raise SystemExit(f"attnext.bench: --device {name} is not supported (supported: cpu, cuda)")
        if device.type == "cuda" and _ops.CUDA_MODULE_ERROR is not None:
            raise SystemExit(f"attnext.bench: --device {name}: attnext's CUDA module is not loaded "
                             f"({_ops.CUDA_MODULE_ERROR})")
        return device
    if _ops.CUDA_MODULE_ERROR is None and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def machine_info(device):
    cpu = info.cpu_info()
    m = {"cpu_model": cpu["model"], "logical_cpus": cpu["logical_cpus"], "usable_cpus": cpu["usable_cpus"],
         "cpu_flags": cpu["flags"], "platform": platform.platform(), "hostname": platform.node(),
         "torch": torch.__version__, "torch_cuda": torch.version.cuda, "python": platform.python_version(),
         "attnext": attnext.__version__, "cpu_unit": _ops.cpu_unit(), "cpu_units_runnable": _ops.cpu_units_runnable(),
         "cuda_module_error": _ops.CUDA_MODULE_ERROR, "build": info.build_info(), "gpu": None}
    if device.type == "cuda" or torch.cuda.is_available():
        p = torch.cuda.get_device_properties(device if device.type == "cuda" else 0)
        m["gpu"] = f"{p.name}, compute capability {p.major}.{p.minor}, {p.multi_processor_count} SMs"
        m["gpu_info"] = info.gpu_info()
    return m


def run_timing(cfgs, args, device, deadline=None):
    """Times every config at every thread count; returns (result rows, peers or configs skipped with their reasons).
    With a `deadline` (time.perf_counter()), a config is not started when the longest one so far would end past it."""
    results, skipped = [], []
    progress = Progress(len(cfgs) * len(args.threads))
    longest = 0.0
    try:
        for threads in args.threads:
            torch.set_num_threads(threads)
            for cfg in cfgs:
                began = time.perf_counter()
                if deadline is not None and began + longest > deadline:
                    skipped.append(dict(config=cfg.label(), threads=threads, peer="all",
                                        reason=f"--time-limit {args.time_limit:g} s reached"))
                    continue
                timings, missing = timing.measure(cfg, device, args.reps, args.warmup, args.slow_ms, args.slow_reps)
                longest = max(longest, time.perf_counter() - began)
                a = timings.pop("attnext")
                results += [timing.result_row(cfg, device, threads, peer, a, t) for peer, t in timings.items()]
                skipped += [dict(config=cfg.label(), threads=threads, peer=p, reason=r) for p, r in missing.items()]
                ratios = ", ".join(f"{p} {t['median_ms'] / a['median_ms']:.2f}x" for p, t in timings.items())
                progress.step(f"{cfg.label()}, {report.threads_text(threads)}: attnext "
                              f"{report.ms_text(a['median_ms'])} ms; ratio {ratios}", f"{cfg.label()}: {ratios}")
    finally:
        progress.close()
    return results, skipped


def memory_mode(args, device, record):
    """--memory: extra peak memory of attnext and SDPA; returns the lines to print."""
    dtype = str(configs.DTYPES[args.memory_dtype]).replace("torch.", "")
    try:
        rows = memory.measure_memory(args.memory_shape, dtype, False, device, args.threads[0], log)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        raise SystemExit(str(exc)) from None
    record["memory"] = rows
    body = ["extra peak memory of one call (fresh process per cell; includes the output and, for fwdbwd, "
            "the gradients); ratio = sdpa / attnext", "", report.memory_table(rows)]
    if not all(r["peak_reset"] for r in rows):
        body.append("note: the peak could not be reset (/proc/self/clear_refs): extra memory may be undercounted")
    return body


def check_mode(cfgs, args, device, record):
    """The correctness check at small sizes, at the largest thread count timed; returns whether all pass."""
    torch.set_num_threads(max(args.threads))
    log(f"checking attnext against the reference on {device} "
        f"(small sizes, {report.threads_text(max(args.threads))})")
    ok, record["check"] = check.run_checks(cfgs, device, log)
    print(f"correctness: {'pass' if ok else 'FAIL'} "
          f"({sum(r['ok'] for r in record['check'])}/{len(record['check'])} cases)", flush=True)
    for r in record["check"]:
        if not r["ok"]:
            print("  " + check.describe(r))
    return ok


def timing_mode(cfgs, args, device, record, deadline=None):
    """attnext against its peers on every config; returns the lines to print."""
    log(f"timing {len(cfgs)} configs x {len(args.threads)} thread setting(s), median of {args.reps}")
    results, skipped = run_timing(cfgs, args, device, deadline)
    record.update(results=results, skipped=skipped)
    body = [f"timing: median of {args.reps} after {args.warmup} warm-up, attnext and peer interleaved; "
            "ratio = peer ms / attnext ms (> 1: attnext faster)", "", report.timing_table(results, device.type), ""]
    body += report.summary_lines(results)
    limited = [s for s in skipped if s["peer"] == "all"]
    body += [f"skipped {s['peer']} on {s['config']} ({report.threads_text(s['threads'])}): {s['reason']}"
             for s in skipped if s["peer"] != "all"]
    if limited:
        body.append(f"not timed: {len(limited)} configs ({limited[0]['reason']}), from {limited[0]['config']} on")
    if args.plot and results:
        report.write_plot(args.plot, results, device.type)
    return body


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    cpu_targets = args.suite == "cpu" and not args.memory and not args.calls
    device = pick_device(args.device or ("cpu" if cpu_targets or args.calls else None))
    if cpu_targets and device.type != "cpu":
        raise SystemExit(f"attnext.bench: --suite cpu runs on the CPU, not on --device {args.device}")
    host = machine_info(device)
    command = "python -m attnext.bench " + " ".join(shlex.quote(a) for a in argv)
    start = time.perf_counter()
    record = {"timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": command, "machine": host, "device": str(device),
              "versions": {k: host[k] for k in ("torch", "torch_cuda", "python", "attnext")}}
    header = report.header_lines(host, device, command)
    if cpu_targets:
        log("measuring the ceilings")
        ceil = machine.ceilings(args.threads)
        ceil["bf16_products_per_lane"] = machine.bf16_products_per_lane(host["cpu_unit"])
        header += machine.ceiling_lines(ceil, host["cpu_unit"])
    print("\n".join(header), flush=True)
    if args.memory:
        body = memory_mode(args, device, record)
    elif args.calls:
        body = calls.calls_mode(args, device, record, log)
    elif cpu_targets:
        plan = cpu_suite.plan(args)
        record.update(shapes=args.shape_list, decode_shapes=args.decode_shape_list,
                      decode_layout=args.decode_layout, dtypes=args.dtypes, modes=args.modes)
        if not args.skip_check and not check_mode(cpu_suite.all_configs(plan), args, device, record):
            if args.json:
                report.write_json(args.json, record)
            log("attnext.bench: correctness check failed; nothing timed")
            return 1
        body = cpu_suite.run(plan, args, device, ceil, record)
    else:
        causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
        cfgs = configs.build_configs(args.shape_list, args.dtypes, args.modes, causals)
        record.update(suite=args.suite, shapes=args.shape_list, dtypes=args.dtypes, modes=args.modes,
                      reps=args.reps, warmup=args.warmup, threads=args.threads, slow_ms=args.slow_ms,
                      slow_reps=args.slow_reps, time_limit=args.time_limit)
        if not args.skip_check and not check_mode(cfgs, args, device, record):
            if args.json:
                report.write_json(args.json, record)
            log("attnext.bench: correctness check failed; nothing timed")
            return 1
        deadline = None if args.time_limit is None else start + args.time_limit
        body = timing_mode(cfgs, args, device, record, deadline)
    record["seconds"] = time.perf_counter() - start
    print("\n" + "\n".join(body), flush=True)
    if args.markdown:
        title = "# attnext CPU targets" if cpu_targets else "# attnext benchmark"
        lines = [title, ""] + [f"- {h}" for h in header] + [""] + body
        report.write_text(args.markdown, "\n".join(lines))
    if args.json:
        report.write_json(args.json, record)
    log(f"done in {record['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
