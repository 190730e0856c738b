"""Extra peak memory of one attention call, forward and forward + backward, each in a fresh process.

On CPU the measure is the peak resident set (VmHWM of /proc/self/status) reached during the call minus
the peak before it, with the inputs already allocated; before the call the peak is reset to the current
resident set (writing 5 to /proc/self/clear_refs) where the kernel allows it. A fresh interpreter per
measurement keeps one run's allocations out of the next (ru_maxrss would not: it is inherited across
fork and exec). On CUDA the measure is torch.cuda.max_memory_allocated over the call.
The extra memory includes the output, and for forward + backward the three input gradients.
"""

import json
import subprocess
import sys

# Runs in a fresh interpreter: python -c CHILD '<json spec>'; prints one JSON line.
CHILD = r"""
import gc, json, sys

def status_bytes(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key + " not in /proc/self/status")

def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

import torch
import torch.nn.functional as F
import attnext

spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
device, dtype, causal = torch.device(spec["device"]), getattr(torch, spec["dtype"]), spec["causal"]
grad = spec["mode"] == "fwdbwd"
if spec["impl"] == "attnext":
    call = lambda q, k, v: attnext.attention(q, k, v, causal=causal)
else:
    call = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)

def inputs(shape):
    q, k, v = (torch.randn(shape, device=device, dtype=dtype).requires_grad_(grad) for _ in range(3))
    return q, k, v, (torch.randn(shape, device=device, dtype=dtype) if grad else None)

def step(q, k, v, dout):
    if grad:
        call(q, k, v).backward(dout)
        return
    with torch.no_grad():
        call(q, k, v)

b, h, s, d = spec["shape"]
step(*inputs((1, h, 64, d)))  # loads code and thread pools, outside the measure
tensors = inputs((b, h, s, d))
gc.collect()
if device.type == "cuda":
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before, reset = torch.cuda.memory_allocated(), True
    step(*tensors)
    torch.cuda.synchronize()
    after = torch.cuda.max_memory_allocated()
else:
    reset = reset_peak()
    before = status_bytes("VmHWM")
    step(*tensors)
    after = status_bytes("VmHWM")
print(json.dumps({"before": before, "after": after, "extra": after - before, "peak_reset": reset}))
"""

IMPLS = ("attnext", "sdpa")
MODES = ("fwd", "fwdbwd")


def measure_one(impl, mode, shape, dtype, causal, device, threads, timeout=900):
    """Runs CHILD in a fresh interpreter; returns its dict (bytes) or raises RuntimeError with its stderr."""
    spec = dict(impl=impl, mode=mode, shape=list(shape), dtype=dtype, causal=causal, device=str(device),
                threads=threads)
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True,
                          timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"attnext.bench: memory measurement of {impl} {mode} failed "
                           f"(exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1])


def measure_memory(shape, dtype, causal, device, threads, log):
    """Extra peak bytes of attnext and torch SDPA, forward and forward + backward; a list of row dicts."""
    rows = []
    for mode in MODES:
        row = dict(device=str(device), dtype=dtype, shape=list(shape), causal=causal, mode=mode, threads=threads)
        for impl in IMPLS:
            log(f"memory: {impl} {mode} {'x'.join(map(str, shape))} {dtype} (fresh process)")
            result = measure_one(impl, mode, shape, dtype, causal, device, threads)
            row[f"{impl}_extra_bytes"] = result["extra"]
            row["peak_reset"] = row.get("peak_reset", True) and result["peak_reset"]
        row["ratio"] = row["sdpa_extra_bytes"] / max(row["attnext_extra_bytes"], 1)
        rows.append(row)
    return rows
