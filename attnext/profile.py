"""`python -m attnext.profile`: runs one attention configuration, for a profiler (ncu, nsys, perf) to look at.

It runs --warmup untimed calls, then --iters measured ones, and prints the median time and FLOP rate. On CUDA
each measured call (for --mode bwd: the backward only; its forward runs before, outside) sits inside
cudaProfilerStart/Stop and inside the NVTX ranges "attnext.profile" and, nested, one named after the
configuration, so that a profiler can be limited to exactly those calls. See docs/profiling.md.
"""

import argparse
import contextlib
import statistics
import sys
import time

import torch

import attnext
from attnext import _nvtx
from attnext.api import _mask_args

RANGE = "attnext.profile"
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "fp32": torch.float32, "float32": torch.float32}
CAUSAL = {"none": False, "top_left": "top_left", "bottom_right": "bottom_right"}
BACKWARD_FACTOR = 2.5  # backward FLOPs = 2.5 x forward, as in attnext.bench

EPILOG = """\
FLOPs: 4*B*Hq*D per visible (query, key) pair, counted exactly for every mask; backward 2.5x.

Nsight Compute (the kernels are C++ templates in namespace attnext::cuda, so match the demangled name):
  # the first measured forward kernel, when each forward call launches one attnext kernel:
  ncu --kernel-name-base demangled --kernel-name regex:attnext --launch-skip 3 --launch-count 1 \\
      python -m attnext.profile --mode fwd --warmup 3 --iters 1 --seq-q 4096 --head-dim 128 --causal top_left
  # only the measured calls, whatever the warm-up and however many kernels a call launches:
  ncu --profile-from-start off --kernel-name-base demangled --kernel-name regex:attnext::cuda::bwd_kernel \\
      --launch-count 1 --set full -o bwd python -m attnext.profile --mode bwd --iters 1
  # the same with NVTX:
  ncu --nvtx --nvtx-include "attnext.profile/" --kernel-name-base demangled --kernel-name regex:attnext \\
      --launch-count 3 python -m attnext.profile --mode bwd --iters 1
Nsight Systems:
  nsys profile -t cuda,nvtx -o attnext python -m attnext.profile --mode bwd --iters 20
On the CPU:
  perf record -g -o perf.data python -m attnext.profile --device cpu --threads 1 --batch 1 --heads 8 \\
      --seq-q 2048 --head-dim 64 --dtype fp32 --iters 50
"""


def _count(text, minimum, option):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{option} {text!r} is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{option} {value} is not supported (supported: >= {minimum})")
    return value


def _size(option, minimum=1):
    return lambda text: _count(text, minimum, option)


def _window(text):
    parts = text.split(",")
    try:
        left, right = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--window {text!r} is not LEFT,RIGHT "
                                         "(integers, -1 for unbounded)") from None
    return left, right


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m attnext.profile", description=__doc__.splitlines()[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=_size("--batch"), default=4, help="B (default: 4)")
    p.add_argument("--heads", type=_size("--heads"), default=16, help="query heads Hq (default: 16)")
    p.add_argument("--kv-heads", type=_size("--kv-heads"), help="key/value heads Hkv (default: --heads)")
    p.add_argument("--seq-q", type=_size("--seq-q"), default=4096, help="query length Sq (default: 4096)")
    p.add_argument("--seq-k", type=_size("--seq-k"), help="key length Sk (default: --seq-q)")
    p.add_argument("--head-dim", type=_size("--head-dim"), default=128, help="D (default: 128)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="default: bf16")
    p.add_argument("--causal", choices=list(CAUSAL), default="none", help="mask alignment (default: none)")
    p.add_argument("--window", type=_window, default=(-1, -1), metavar="LEFT,RIGHT",
                   help="sliding window, -1 = unbounded (default: -1,-1)")
    p.add_argument("--mode", choices=("fwd", "bwd"), default="fwd",
                   help="fwd, or bwd: the backward alone, its forward outside the measured region (default: fwd)")
    p.add_argument("--layout", choices=("bhsd", "bshd"), default="bhsd", help="default: bhsd")
    p.add_argument("--warmup", type=_size("--warmup", 0), default=3, help="untimed calls first (default: 3)")
    p.add_argument("--iters", type=_size("--iters"), default=10, help="measured calls (default: 10)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if a GPU is visible, else cpu)")
    p.add_argument("--threads", type=_size("--threads"), help="torch threads on the CPU (default: torch's)")
    args = p.parse_args(argv)
    args.kv_heads = args.kv_heads or args.heads
    args.seq_k = args.seq_k or args.seq_q
    if args.heads % args.kv_heads:
        p.error(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads} "
                "(grouped-query attention needs Hq % Hkv == 0)")
    try:
        args.mask = _mask_args("attnext.profile", CAUSAL[args.causal], args.window)
    except ValueError as exc:
        p.error(f"--causal {args.causal} --window {args.window[0]},{args.window[1]}: "
                + str(exc).removeprefix("attnext.profile: "))
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        p.error(f"--device {args.device!r} is not supported (supported: cpu, cuda, cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device is visible (torch.cuda.is_available() is False; "
                "supported here: cpu)")
    args.device = device
    return args


def visible_pairs(seq_q, seq_k, mask_kind, left, right):
    """Exact number of (query, key) pairs the mask lets through (the rule of attnext.reference.visible)."""
    offset = 0 if mask_kind == 1 else seq_k - seq_q
    if mask_kind in (1, 2):
        right = 0
    i = torch.arange(seq_q, dtype=torch.int64)
    lo = (i + offset - left).clamp(min=0) if left >= 0 else torch.zeros_like(i)
    hi = (i + offset + right).clamp(max=seq_k - 1) if right >= 0 else torch.full_like(i, seq_k - 1)
    return int((hi - lo + 1).clamp(min=0).sum())


def make_inputs(args):
    """q, k, v (and dout for bwd) in the requested layout, dtype and device."""
    dtype, grad = DTYPES[args.dtype], args.mode == "bwd"
    b, hq, hkv, sq, sk, d = args.batch, args.heads, args.kv_heads, args.seq_q, args.seq_k, args.head_dim

    def shape(h, s):
        return (b, s, h, d) if args.layout == "bshd" else (b, h, s, d)

    make = dict(device=args.device, dtype=dtype)
    q = torch.randn(shape(hq, sq), **make).requires_grad_(grad)
    k, v = (torch.randn(shape(hkv, sk), **make).requires_grad_(grad) for _ in range(2))
    dout = torch.randn(shape(hq, sq), **make) if grad else None
    return q, k, v, dout


@contextlib.contextmanager
def measured(name, device):
    """On CUDA: NVTX ranges RANGE > `name` and cudaProfilerStart/Stop around the block, the GPU idle at both
    ends. On the CPU: nothing."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.synchronize(device)
    with _nvtx.nvtx_range(RANGE), _nvtx.nvtx_range(name):
        torch.cuda.cudart().cudaProfilerStart()
        try:
            yield
        finally:
            torch.cuda.synchronize(device)
            torch.cuda.cudart().cudaProfilerStop()


class Stopwatch:
    """Milliseconds from construction to stop(): CUDA events on the GPU, the wall clock on the CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.start = time.perf_counter()

    def stop(self):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            return self.start.elapsed_time(self.end)
        return (time.perf_counter() - self.start) * 1e3


def run(args):
    """Warm-up, then the measured calls; returns the median milliseconds per call and the list of samples."""
    q, k, v, dout = make_inputs(args)
    kind, left, right = args.mask
    causal = CAUSAL[args.causal]

    def forward():
        return attnext.attention(q, k, v, causal=causal, window_size=args.window, layout=args.layout)

    name = _nvtx.config_name(f"attnext.{args.mode}", q, k, kind, left, right, args.layout == "bshd")
    samples = []
    for i in range(args.warmup + args.iters):
        if args.mode == "fwd":
            region = measured(name, args.device) if i >= args.warmup else contextlib.nullcontext()
            with torch.no_grad(), region:
                watch = Stopwatch(args.device)
                forward()
                ms = watch.stop()
        else:
            q.grad = k.grad = v.grad = None
            out = forward()
            region = measured(name, args.device) if i >= args.warmup else contextlib.nullcontext()
            with region:
                watch = Stopwatch(args.device)
                out.backward(dout)
                ms = watch.stop()
        if i >= args.warmup:
            samples.append(ms)
    return name, samples


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        name, samples = run(args)
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        print(f"attnext.profile: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    kind, left, right = args.mask
    flops = 4 * args.batch * args.heads * args.head_dim * visible_pairs(args.seq_q, args.seq_k, kind, left, right)
    flops *= BACKWARD_FACTOR if args.mode == "bwd" else 1
    median = statistics.median(samples)
    unit, divisor = ("TFLOP/s", 1e12) if args.device.type == "cuda" else ("GFLOP/s", 1e9)
    n = torch.get_num_threads()
    threads = f", {n} thread{'s' if n != 1 else ''}" if args.device.type == "cpu" else ""
    print(f"attnext.profile: {name} on {args.device}{threads}: {len(samples)} calls after {args.warmup} warm-up, "
          f"median {median:.3f} ms (min {min(samples):.3f}), {flops / (median * 1e-3) / divisor:.4g} {unit}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
