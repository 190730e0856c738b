"""Timing attnext and its peers side by side: same process, same inputs, calls interleaved, medians.

On CPU the peer is torch.nn.functional.scaled_dot_product_attention as torch dispatches it. On CUDA each
SDPA backend (flash, efficient, cudnn) is forced in turn with torch.nn.attention.sdpa_kernel and is a
peer of its own; a backend that cannot run a config is left out of that config's results.
"""

import functools
import gc
import math
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

import attnext
from attnext.bench import report


def attnext_call(causal):
    return lambda q, k, v: attnext.attention(q, k, v, causal=causal)


def sdpa_call(causal, backend=None, gqa=False):
    """torch's SDPA; is_causal is top-left aligned, the same as attnext's causal=True. `gqa`: enable_gqa=True,
    for K/V with fewer heads than the queries (attnext takes those as they are)."""
    extra = {"enable_gqa": True} if gqa else {}
    if backend is None:
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal, **extra)
    from torch.nn.attention import sdpa_kernel

    def call(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, **extra)
    return call


def peer_backends(device):
    """(name, backend) of the peers: torch's own choice on CPU, each forced backend on CUDA."""
    if device.type != "cuda":
        return [("sdpa", None)]
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:  # an old torch: no way to force a backend
        return [("sdpa", None)]
    names = (("flash", "FLASH_ATTENTION"), ("efficient", "EFFICIENT_ATTENTION"), ("cudnn", "CUDNN_ATTENTION"))
    return [(f"sdpa-{name}", getattr(SDPBackend, attr)) for name, attr in names if hasattr(SDPBackend, attr)]


def impls_for(causal, device, gqa=False):
    """{name: call}: attnext first, then its peers."""
    impls = {"attnext": attnext_call(causal)}
    for name, backend in peer_backends(device):
        impls[name] = sdpa_call(causal, backend, gqa)
    return impls


class Case:
    """The inputs of one config (a configs.Config or DecodeConfig), created once, and one timed step of a call."""

    def __init__(self, config, device, seed=0, cold_kv_bytes=0):
        """`cold_kv_bytes`: enough copies of K and V to fill this many bytes, used in turn, so that each step
        reads K and V from memory rather than from a cache that still holds them from the step before."""
        torch.manual_seed(seed)
        self.grad = config.mode in ("bwd", "fwdbwd")
        self.backward_only = config.mode == "bwd"
        self.device = device
        make = dict(device=device, dtype=config.dtype)
        self.q = torch.randn(config.q_shape, **make).requires_grad_(self.grad)
        kv_bytes = 2 * math.prod(config.kv_shape) * config.dtype.itemsize
        copies = max(1, -(-cold_kv_bytes // kv_bytes))
        self.kvs = [tuple(self._kv(config, make) for _ in range(2)) for _ in range(copies)]
        self.turn = 0
        self.dout = torch.randn(config.q_shape, **make) if self.grad else None

    def _kv(self, config, make):
        """One K or V tensor; a (batch, head, key, dim) view of (batch, key, head, dim) memory for a decode
        config whose kv_layout is "bshd"."""
        if getattr(config, "kv_layout", "bhsd") == "bshd":
            b, h, s, d = config.kv_shape
            return torch.randn(b, s, h, d, **make).transpose(1, 2)
        return torch.randn(config.kv_shape, **make).requires_grad_(self.grad)

    def _step(self, call, k, v):
        if self.grad:
            call(self.q, k, v).backward(self.dout)
        else:
            with torch.no_grad():
                call(self.q, k, v)

    def run(self, call):
        """Milliseconds of one step (forward, backward, or forward + backward); gradients are cleared and, for the
        backward alone, the forward is run outside the timing."""
        k, v = self.kvs[self.turn]
        self.turn = (self.turn + 1) % len(self.kvs)
        self.q.grad = k.grad = v.grad = None
        if self.backward_only:
            step = functools.partial(call(self.q, k, v).backward, self.dout)
        else:
            step = functools.partial(self._step, call, k, v)
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        start = time.perf_counter()
        step()
        return (time.perf_counter() - start) * 1e3


AGAIN = "attnext back to back"  # measure(again=True): the attnext call made right after each timed one


def measure(config, device, reps, warmup, slow_ms=None, slow_reps=None, cold_kv_bytes=0, again=False):
    """Times attnext and each peer on `config`: A, B, A, B, ... after `warmup` rounds.

    When a call of the first warm-up round takes more than `slow_ms`, `slow_reps` timed rounds follow it and
    no other warm-up (the number taken is len(samples_ms)). `cold_kv_bytes`: see Case. `again`: each attnext
    call is followed at once by another (on the next K/V copy), timed as AGAIN: A, A', B, A, A', B, ... The
    A' calls follow attnext's own call rather than a peer's, as the calls of a decode loop follow each other.
    Returns {name: {"median_ms", "min_ms", "samples_ms"}} and {name: reason} for peers that could not run.
    """
    case = Case(config, device, cold_kv_bytes=cold_kv_bytes)
    impls = impls_for(config.causal, device, gqa=config.kv_shape[1] != config.q_shape[1])
    skipped = {}
    first_ms = 0.0
    for name, call in list(impls.items()):
        # The first warm-up round: a forced backend without a kernel for this config raises here, after
        # warnings that say why; those become the reason it is skipped.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                first_ms = max(first_ms, case.run(call))
            except RuntimeError as exc:
                if name == "attnext":
                    raise
                reasons = [str(w.message).splitlines()[0] for w in caught] + [str(exc).splitlines()[0]]
                skipped[name] = "; ".join(dict.fromkeys(r for r in reasons if r))
                del impls[name]
    if slow_ms is not None and first_ms > slow_ms:
        reps, warmup = min(reps, slow_reps), 1
    samples = {name: [] for name in impls}
    if again:
        samples[AGAIN] = []
    gc.collect()
    gc_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(max(warmup - 1, 0) + reps):
            for name, call in impls.items():
                ms = case.run(call)
                if i >= warmup - 1:
                    samples[name].append(ms)
                if again and name == "attnext":
                    ms = case.run(call)
                    if i >= warmup - 1:
                        samples[AGAIN].append(ms)
    finally:
        if gc_enabled:
            gc.enable()
    del case
    timings = {name: {"median_ms": statistics.median(ts), "min_ms": min(ts), "samples_ms": ts}
               for name, ts in samples.items()}
    return timings, skipped


def result_row(cfg, device, threads, peer, a, t):
    """One table row: attnext's and a peer's medians on `cfg`, with FLOP rates and the ratio."""
    _, divisor = report.rate_unit(device.type)
    flops = cfg.flops()
    return dict(device=device.type, dtype=cfg.dtype_name, batch=cfg.batch, heads=cfg.heads, seqlen=cfg.seqlen,
                head_dim=cfg.head_dim, causal=cfg.causal, mode=cfg.mode, threads=threads, peer=peer, flops=flops,
                attnext_ms=a["median_ms"], peer_ms=t["median_ms"],
                attnext_rate=flops / (a["median_ms"] * 1e-3) / divisor,
                peer_rate=flops / (t["median_ms"] * 1e-3) / divisor,
                ratio=t["median_ms"] / a["median_ms"], reps=len(a["samples_ms"]), attnext_samples_ms=a["samples_ms"],
                peer_samples_ms=t["samples_ms"])
