"""Timing attnext and its peers side by side: same process, same inputs, calls interleaved, medians.

On CPU the peer is torch.nn.functional.scaled_dot_product_attention as torch dispatches it. On CUDA each
SDPA backend (flash, efficient, cudnn) is forced in turn with torch.nn.attention.sdpa_kernel and is a
peer of its own; a backend that cannot run a config is left out of that config's results.
"""

import gc
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

import attnext


def attnext_call(causal):
    return lambda q, k, v: attnext.attention(q, k, v, causal=causal)


def sdpa_call(causal, backend=None):
    """torch's SDPA; is_causal is top-left aligned, the same as attnext's causal=True."""
    if backend is None:
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    from torch.nn.attention import sdpa_kernel

    def call(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
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


def impls_for(causal, device):
    """{name: call}: attnext first, then its peers."""
    impls = {"attnext": attnext_call(causal)}
    for name, backend in peer_backends(device):
        impls[name] = sdpa_call(causal, backend)
    return impls


class Case:
    """The inputs of one config, created once, and one timed step of a given call."""

    def __init__(self, config, device, seed=0):
        torch.manual_seed(seed)
        self.grad = config.mode == "fwdbwd"
        self.device = device
        make = dict(device=device, dtype=config.dtype)
        self.q, self.k, self.v = (torch.randn(config.shape, **make).requires_grad_(self.grad) for _ in range(3))
        self.dout = torch.randn(config.shape, **make) if self.grad else None

    def _step(self, call):
        if self.grad:
            call(self.q, self.k, self.v).backward(self.dout)
        else:
            with torch.no_grad():
                call(self.q, self.k, self.v)

    def run(self, call):
        """Milliseconds of one step (forward, or forward + backward); gradients are cleared outside the timing."""
        self.q.grad = self.k.grad = self.v.grad = None
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self._step(call)
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        start = time.perf_counter()
        self._step(call)
        return (time.perf_counter() - start) * 1e3


def measure(config, device, reps, warmup):
    """Times attnext and each peer on `config`: A, B, A, B, ... after `warmup` rounds.

    Returns {name: {"median_ms", "min_ms", "samples_ms"}} and {name: reason} for peers that could not run.
    """
    case = Case(config, device)
    impls = impls_for(config.causal, device)
    skipped = {}
    for name, call in list(impls.items()):
        # The first warm-up round: a forced backend without a kernel for this config raises here, after
        # warnings that say why; those become the reason it is skipped.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                case.run(call)
            except RuntimeError as exc:
                if name == "attnext":
                    raise
                reasons = [str(w.message).splitlines()[0] for w in caught] + [str(exc).splitlines()[0]]
                skipped[name] = "; ".join(dict.fromkeys(r for r in reasons if r))
                del impls[name]
    samples = {name: [] for name in impls}
    gc.collect()
    gc_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(max(warmup - 1, 0) + reps):
            for name, call in impls.items():
                ms = case.run(call)
                if i >= warmup - 1:
                    samples[name].append(ms)
    finally:
        if gc_enabled:
            gc.enable()
    del case
    timings = {name: {"median_ms": statistics.median(ts), "min_ms": min(ts), "samples_ms": ts}
               for name, ts in samples.items()}
    return timings, skipped
