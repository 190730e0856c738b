"""What this CPU gives at the moment: the per-core FMA peak, the memory read bandwidth, and how many
cores' worth two threads get.

The vCPUs of a shared machine give between one and two cores' worth, minute to minute, so these are
measured in the same run as the kernels they judge, and the two-core probe right beside the 1- and
2-thread timings it qualifies.

The probe: torch.ops.attnext.cpu_fma_peak (the FMA loop of attnext's active CPU unit) called in a loop
for a fixed window, first on one Python thread, then on two at once. The op releases the GIL while it
runs (torch.ops calls do), so two threads run it in parallel; cores' worth = loop iterations completed by
the two threads together / by the one thread alone, in the same window. 2.0 means two full cores.
"""

import os
import statistics
import threading
import time

import torch

BUSY_OTHERS = 0.25  # cores' worth used by other processes from which a row is marked as disturbed
PROBE_NAME = "torch.ops.attnext.cpu_fma_peak in 1 vs 2 concurrent Python threads (the op releases the GIL)"
BANDWIDTH_MIB = 256


def _calibrated_iters(seconds):
    """Iterations of cpu_fma_peak that take about `seconds` on this thread."""
    iters = 200_000
    while True:
        start = time.perf_counter()
        torch.ops.attnext.cpu_fma_peak(iters)
        took = time.perf_counter() - start
        if took > 0.02:
            return max(1, int(iters * seconds / took))
        iters *= 4


def fma_peak(runs=3, seconds=0.3):
    """Per-core FMA peak in GFLOP/s: the best of `runs` runs of about `seconds` each, on the calling thread."""
    iters = _calibrated_iters(seconds)
    return max(torch.ops.attnext.cpu_fma_peak(iters) for _ in range(runs))


_buffers = {}


def read_buffer(mib):
    """A float32 tensor of `mib` MiB to read through, made once per size and kept, so that repeated probes
    and evictions do not allocate (and fault in) it each time."""
    if mib not in _buffers:
        _buffers[mib] = torch.ones(mib * 1024 * 1024 // 4)
    return _buffers[mib]


def read_bandwidth(threads, runs=7, mib=BANDWIDTH_MIB):
    """Memory read bandwidth in GB/s: x.sum() over read_buffer(mib) at `threads` torch threads, median of
    `runs`, after one untimed pass."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = read_buffer(mib)
        x.sum()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            x.sum()
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return x.numel() * 4 / statistics.median(times) / 1e9


def _loop_until(deadline, iters, counts, slot):
    n = 0
    while time.perf_counter() < deadline:
        torch.ops.attnext.cpu_fma_peak(iters)
        n += 1
    counts[slot] = n


def cores_worth(window=0.4, chunk=0.01):
    """How many cores' worth two threads get now: see the module docstring. Returns a float (about 1 to 2)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        iters = _calibrated_iters(chunk)
        alone = [0]
        _loop_until(time.perf_counter() + window, iters, alone, 0)
        both = [0, 0]
        deadline = time.perf_counter() + window
        workers = [threading.Thread(target=_loop_until, args=(deadline, iters, both, i)) for i in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        torch.set_num_threads(previous)
    return sum(both) / max(alone[0], 1)


def ceilings(thread_counts):
    """The ceilings of the header: {"fma_peak_gflops", "bandwidth_gbs": {threads: GB/s}, "cores_worth"}."""
    return {"fma_peak_gflops": fma_peak(),
            "bandwidth_gbs": {n: read_bandwidth(n) for n in sorted(set(thread_counts) | {1})},
            "cores_worth": cores_worth()}


def bf16_products_per_lane(unit):
    """Products per fp32 lane per instruction that attnext's bf16 decode runs on with CPU unit `unit`: 2 on
    AVX512_BF16 (vdpbf16ps sums two bf16 products into each lane; both decode products run on it where the
    head dim is a multiple of 64, fewer elsewhere, so a cap taken from it is an upper bound), else 1 (an
    FMA on widened values)."""
    return 2 if unit == "avx512bf16" else 1


def ceiling_lines(c, unit):
    """Header lines describing ceilings `c` (as returned by ceilings()); `unit` is attnext's CPU unit."""
    bandwidth = ", ".join(f"{n} thread{'s' if n > 1 else ''} {gbs:.1f} GB/s" for n, gbs in c["bandwidth_gbs"].items())
    return [f"per-core FMA peak: {c['fma_peak_gflops']:.1f} GFLOP/s (attnext's {unit} FMA loop, "
            "torch.ops.attnext.cpu_fma_peak, best of 3 runs of ~0.3 s)",
            f"memory read bandwidth: {bandwidth} (x.sum() over {BANDWIDTH_MIB} MiB float32, median of 7)",
            f"two threads gave {c['cores_worth']:.2f} cores' worth (probe: {PROBE_NAME})"]


def ceiling_summary(c):
    """The ceilings `c` on one line."""
    bandwidth = ", ".join(f"{gbs:.1f} GB/s at {n} thread{'s' if n > 1 else ''}"
                          for n, gbs in c["bandwidth_gbs"].items())
    return (f"FMA peak {c['fma_peak_gflops']:.1f} GFLOP/s; read bandwidth {bandwidth}; "
            f"two threads {c['cores_worth']:.2f} cores' worth")


def _busy_seconds():
    """CPU seconds all CPUs spent busy since boot (user, nice, system, irq, softirq, steal), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """`with OtherLoad() as load:` ... then load.cores: the CPU time that other processes used (or the
    hypervisor stole) while the block ran, in cores' worth (CPU seconds per second); None without /proc/stat.
    load.disturbed: whether that exceeds BUSY_OTHERS and 50 ms in all."""

    def __enter__(self):
        self.start = (time.perf_counter(), _busy_seconds(), sum(os.times()[:2]))
        self.cores, self.disturbed = None, False
        return self

    def __exit__(self, *exc):
        wall, busy, own = time.perf_counter(), _busy_seconds(), sum(os.times()[:2])
        if busy is not None and self.start[1] is not None:
            others = max(0.0, (busy - self.start[1]) - (own - self.start[2]))
            self.cores = others / max(wall - self.start[0], 1e-9)
            self.disturbed = self.cores > BUSY_OTHERS and others > 0.05
        return False
