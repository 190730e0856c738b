"""What attnext was built with and what it runs on here: `python -m attnext.info [--json]`.

Prints the versions, the CPU units and CUDA module built (and why not), the CPU unit chosen at run
time, the CPU's relevant features, torch's thread count, the GPUs, and the result of a short
self-test (a small attention against attnext.reference, forward and backward).
"""

import argparse
import json
import os
import platform
import sys
import time

import torch

X86_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16")
ARM_FLAGS = ("asimd", "asimdhp", "bf16", "sve")


def _cpuinfo():
    """(model name, set of flags) from /proc/cpuinfo, or (None, None) where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return None, None
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model") and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, flags


def cpu_info():
    """CPU model, logical CPUs (and those this process may use), and the features that matter to attnext."""
    model, flags = _cpuinfo()
    arm = platform.machine().lower() in ("aarch64", "arm64")
    wanted = ARM_FLAGS if arm else X86_FLAGS
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = None
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        capability = None
    return {
        "model": model or platform.processor() or platform.machine() or "unknown",
        "arch": platform.machine(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "flags": None if flags is None else {name: name in flags for name in wanted},
        "torch_cpu_capability": capability,
    }


def build_info():
    """What setup.py built, from attnext/_build_info.py (absent in a tree that was never built)."""
    try:
        from attnext import _build_info as b
    except ImportError as exc:
        return {"error": f"attnext/_build_info.py not found ({exc})"}
    return {name.lower(): getattr(b, name, None)
            for name in ("TORCH_VERSION", "TORCH_CUDA_VERSION", "PYTHON_VERSION", "CPU_UNITS", "CPU_UNITS_SKIPPED",
                         "CUDA_BUILT", "CUDA_REASON", "CUDA_ARCH_LIST")}


def runtime_info():
    """The loaded extension: version, CPU units, CUDA module; {"error": ...} if attnext cannot be imported."""
    try:
        import attnext
        from attnext import _ops
    except Exception as exc:  # a missing or broken native module: report it instead of a traceback
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {
        "version": attnext.__version__,
        "cpu_unit": _ops.cpu_unit(),
        "cpu_units_runnable": _ops.cpu_units_runnable(),
        "cuda_module_loaded": _ops.CUDA_MODULE_ERROR is None,
        "cuda_module_error": _ops.CUDA_MODULE_ERROR,
    }


def cuda_module_archs():
    """The GPU code in attnext's CUDA module, read from the file without loading it: {"path", "sass", "ptx"},
    or {"path": None, ...} where the module was not built."""
    import importlib.util

    from attnext import _fatbin

    try:
        spec = importlib.util.find_spec("attnext._C_cuda")
    except ImportError:  # attnext itself cannot be imported
        spec = None
    if spec is None or not spec.origin:
        return {"path": None, "sass": [], "ptx": []}
    try:
        return {"path": spec.origin, **_fatbin.archs(spec.origin)}
    except OSError as exc:
        return {"path": spec.origin, "sass": [], "ptx": [], "error": str(exc)}


def _device_info(i, module):
    from attnext import _fatbin

    p = torch.cuda.get_device_properties(i)
    d = {"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
         "memory_gib": round(p.total_memory / 2**30, 1), "multiprocessors": p.multi_processor_count}
    for key, attr in (("l2_cache_mib", "L2_cache_size"), ("shared_memory_per_block_optin_kib",
                                                           "shared_memory_per_block_optin"),
                      ("shared_memory_per_sm_kib", "shared_memory_per_multiprocessor")):
        value = getattr(p, attr, None)
        d[key] = None if value is None else round(value / (2**20 if key.endswith("mib") else 2**10), 1)
    d["registers_per_sm"] = getattr(p, "regs_per_multiprocessor", None)
    d["clock_mhz"] = getattr(p, "clock_rate", None) and round(p.clock_rate / 1000)
    if module["path"] is not None:
        d["attnext_code"] = _fatbin.runs_on(module, p.major, p.minor)
    return d


def gpu_info():
    """torch's CUDA build, the visible GPUs and their properties, and the GPU code in attnext's CUDA module
    (CUDA is queried only here, never at import)."""
    module = cuda_module_archs()
    info = {"torch_cuda": torch.version.cuda, "available": torch.cuda.is_available(), "devices": [],
            "cudnn": None, "torch_arch_list": [], "attnext_cuda_module": module}
    if info["available"]:
        info["torch_arch_list"] = torch.cuda.get_arch_list()
        info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        for i in range(torch.cuda.device_count()):
            info["devices"].append(_device_info(i, module))
    return info


def self_test(devices):
    """A small attention, forward and backward, fp32 and bf16 causal, against the reference (about 1 s)."""
    from attnext.bench.check import check_case

    start = time.perf_counter()
    cases = 0
    try:
        for device in devices:
            for dtype, causal in ((torch.float32, False), (torch.bfloat16, True)):
                result = check_case(dtype, 1, 2, 2, 97, 97, 64, causal, "fwdbwd", torch.device(device))
                cases += 1
                if not result["ok"]:
                    bad = {k: v for k, v in result["errors"].items() if not v["err"] <= v["tol"]}
                    return {"ok": False, "error": f"{dtype} causal={causal} on {device}: {bad}",
                            "seconds": time.perf_counter() - start}
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "seconds": time.perf_counter() - start}
    return {"ok": True, "error": None, "cases": cases, "devices": list(devices),
            "seconds": time.perf_counter() - start}


def collect(run_self_test=True):
    """Everything `python -m attnext.info` reports, as a dict."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "torch_num_threads": torch.get_num_threads(),
        "cpu": cpu_info(),
        "build": build_info(),
        "runtime": runtime_info(),
        "gpu": gpu_info(),
    }
    if run_self_test:
        if "error" in info["runtime"]:
            info["self_test"] = {"ok": False, "error": "attnext could not be imported"}
        else:
            devices = ["cpu"]
            if info["gpu"]["available"] and info["runtime"]["cuda_module_loaded"]:
                devices.append("cuda")
            info["self_test"] = self_test(devices)
    return info


def _yes_no(value):
    return "yes" if value else "no"


def _amount(value, unit):
    """'12.5 MiB', or 'unknown' where this torch does not report the device property."""
    return "unknown" if value is None else f"{value} {unit}"


def format_text(info):
    """The human-readable report."""
    b, r, c, g = info["build"], info["runtime"], info["cpu"], info["gpu"]
    lines = [f"attnext {r.get('version', '(not importable)')}",
             f"python {info['python']}, torch {info['torch']}, {info['platform']}", ""]
    lines.append("built:")
    if "error" in b:
        lines.append(f"  {b['error']}")
    else:
        lines.append(f"  against torch {b['torch_version']}"
                     + (f" (CUDA {b['torch_cuda_version']})" if b["torch_cuda_version"] else "")
                     + f", Python {b['python_version']}")
        lines.append(f"  CPU units: {', '.join(b['cpu_units'] or []) or 'none'}")
        for unit, reason in (b["cpu_units_skipped"] or {}).items():
            lines.append(f"  CPU unit {unit} skipped: {reason}")
        cuda = "yes" + (f" (archs {b['cuda_arch_list']})" if b["cuda_arch_list"] else "") if b["cuda_built"] else "no"
        lines.append(f"  CUDA module: {cuda}" + (f": {b['cuda_reason']}" if b["cuda_reason"] else ""))
    lines += ["", "runtime:"]
    if "error" in r:
        lines.append(f"  attnext cannot be imported: {r['error']}")
    else:
        lines.append(f"  CPU unit: {r['cpu_unit']} (runnable here: {', '.join(r['cpu_units_runnable'])})")
        if r["cuda_module_loaded"]:
            lines.append("  CUDA module: loaded")
        elif b.get("cuda_built") is False:
            lines.append("  CUDA module: not loaded (not built)")
        else:
            lines.append(f"  CUDA module: not loaded ({r['cuda_module_error']})")
    lines.append(f"  torch threads: {info['torch_num_threads']}")
    lines += ["", "CPU:"]
    usable = f", {c['usable_cpus']} usable" if c["usable_cpus"] is not None else ""
    lines.append(f"  {c['model']} ({c['arch']}), {c['logical_cpus']} logical CPUs{usable}")
    if c["flags"] is not None:
        lines.append("  " + ", ".join(f"{name} {_yes_no(have)}" for name, have in c["flags"].items()))
    if c["torch_cpu_capability"]:
        lines.append(f"  torch CPU capability: {c['torch_cpu_capability']}")
    lines += ["", "GPU:"]
    lines.append(f"  torch CUDA: {g['torch_cuda'] or 'none (CPU-only torch)'}; "
                 f"torch.cuda.is_available(): {_yes_no(g['available'])}")
    module = g["attnext_cuda_module"]
    if module["path"] is not None:
        code = ", ".join(module["sass"] + module["ptx"]) or module.get("error") or "no GPU code found"
        lines.append(f"  attnext CUDA module holds: {code}")
    if g["available"]:
        lines.append(f"  torch archs: {' '.join(g['torch_arch_list']) or 'unknown'}; cuDNN: {g['cudnn'] or 'none'}")
    for d in g["devices"]:
        lines.append(f"  cuda:{d['index']}: {d['name']}, compute capability {d['capability']}, "
                     f"{d['memory_gib']} GiB, {d['multiprocessors']} SMs, L2 {_amount(d['l2_cache_mib'], 'MiB')}, "
                     f"shared memory {_amount(d['shared_memory_per_block_optin_kib'], 'KiB')} per block "
                     f"({_amount(d['shared_memory_per_sm_kib'], 'KiB')} per SM), "
                     f"{_amount(d['registers_per_sm'], 'registers')} per SM"
                     + (f", {d['clock_mhz']} MHz" if d["clock_mhz"] else ""))
        if "attnext_code" in d:
            lines.append(f"    attnext code for it: {d['attnext_code'] or 'NONE (no kernel image for this GPU)'}")
    if "self_test" in info:
        t = info["self_test"]
        lines.append("")
        if t["ok"]:
            lines.append(f"self-test: ok ({t['cases']} cases on {', '.join(t['devices'])}, {t['seconds']:.2f} s)")
        else:
            lines.append(f"self-test: FAILED: {t['error']}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m attnext.info", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the same information as JSON")
    parser.add_argument("--no-self-test", action="store_true", help="skip the self-test")
    args = parser.parse_args(argv)
    info = collect(run_self_test=not args.no_self_test)
    print(json.dumps(info, indent=1) if args.json else format_text(info))
    failed = "error" in info["runtime"] or not info.get("self_test", {"ok": True})["ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
