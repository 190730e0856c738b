"""NVTX ranges for Nsight Systems and Nsight Compute, named after each op call's configuration.

nvtx_range(name) pushes and pops an NVTX range when this torch is a CUDA build, and does nothing on a CPU-only
torch (where torch.cuda.nvtx raises). Nothing here queries or initialises CUDA: whether NVTX exists is read from
torch's build (torch._C._nvtx), never from a device.

op_range(op, q, k, ...) is the per-call range of attnext's ops, e.g. "attnext.fwd bf16 B4 H16 KV16 S4096x4096
D128 causal". It costs one flag test unless enabled: ATTNEXT_NVTX=1 turns it on, ATTNEXT_NVTX=0 off; unset, it is
on when an NVTX tool is injected (NVTX_INJECTION64_PATH, which Nsight tools set for the processes they launch).
set_op_ranges(flag) changes it at run time. Inside torch.compile tracing it does nothing, so that compiled graphs
do not break on it. Names avoid "/", which Nsight Compute's --nvtx-include reads as a range separator.
"""

import contextlib
import os

import torch

try:  # the same test torch.cuda.nvtx makes: the bindings exist only in CUDA builds
    from torch._C import _nvtx as _bindings  # noqa: F401
    AVAILABLE = True
except ImportError:
    AVAILABLE = False

_NULL = contextlib.nullcontext()
_MASKS = {0: "full", 1: "causal", 2: "causal_bottom_right", 3: "window"}


def _env_enabled():
    value = os.environ.get("ATTNEXT_NVTX")
    if value in ("0", "1"):
        return value == "1"
    return bool(os.environ.get("NVTX_INJECTION64_PATH"))


_op_ranges = AVAILABLE and _env_enabled()


def set_op_ranges(flag):
    """Turns the per-call op ranges on or off (a no-op without NVTX); returns the previous setting."""
    global _op_ranges
    previous = _op_ranges
    _op_ranges = bool(flag) and AVAILABLE
    return previous


def op_ranges_enabled():
    return _op_ranges


class _Range:
    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        torch.cuda.nvtx.range_push(self.name)
        return self

    def __exit__(self, *exc):
        torch.cuda.nvtx.range_pop()
        return False


def nvtx_range(name):
    """`with nvtx_range(name):` an NVTX push/pop range around the block; a no-op on CPU-only torch."""
    return _Range(name) if AVAILABLE else _NULL


def config_name(op, q, k, mask_kind=0, window_left=-1, window_right=-1, bshd=False):
    """E.g. "attnext.fwd bf16 B4 H16 KV4 S4096x4096 D128 causal" for 4-D q and k in either layout."""
    dtype = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(q.dtype, str(q.dtype))
    if q.dim() != 4 or k.dim() != 4:
        return f"{op} {dtype} {tuple(q.shape)}"
    b, sq, hq = (q.shape[0], q.shape[1], q.shape[2]) if bshd else (q.shape[0], q.shape[2], q.shape[1])
    sk, hkv = (k.shape[1], k.shape[2]) if bshd else (k.shape[2], k.shape[1])
    mask = _MASKS.get(mask_kind, f"mask{mask_kind}")
    if mask_kind == 3 or (mask_kind in (1, 2) and window_left >= 0):
        mask += f"({window_left},{window_right})"
    return (f"{op} {dtype} B{b} H{hq} KV{hkv} S{sq}x{sk} D{q.shape[-1]} {mask}"
            + (" bshd" if bshd else ""))


def op_range(op, q, k, mask_kind=0, window_left=-1, window_right=-1, bshd=False):
    """The range around one op call, named by config_name(); a shared no-op unless enabled (see the module doc)."""
    if not _op_ranges or torch.compiler.is_compiling():
        return _NULL
    return _Range(config_name(op, q, k, mask_kind, window_left, window_right, bshd))
