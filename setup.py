"""Build of attnext's native modules against the torch already installed.

    pip install --no-build-isolation .        (or -e . for development)

attnext._C (CPU kernels and the op schemas) is always built. The CPU kernels are torch-free; each
vector unit is its own translation unit compiled with its own ISA flags and picked at run time.
attnext._C_cuda is built when torch has CUDA, nvcc is found and CUDA sources are present
(ATTNEXT_FORCE_CPU=1 skips it; FORCE_CUDA=1 makes a missing toolkit an error).
Both use the LibTorch stable ABI and Python's limited API: one build serves torch >= 2.10 and Python >= 3.10.
"""

import glob
import os
import platform
import shutil
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup


def _cuda_home_with_runtime():
    """Sets CUDA_HOME, when unset, to a toolkit root that holds nvcc and the CUDA runtime library: torch guesses the
    parent of nvcc's folder, which is wrong where nvcc is installed outside the toolkit (/usr/local/bin)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = ([os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []) + ["/usr/local/cuda"]
    for root in candidates:
        runtime = any(os.path.exists(os.path.join(root, lib, "libcudart.so")) for lib in ("lib64", "lib"))
        if runtime and os.path.exists(os.path.join(root, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = root
            return


_cuda_home_with_runtime()

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:
    sys.exit("attnext: torch must be installed before building (pip install torch, then "
             "pip install --no-build-isolation .)")

ROOT = os.path.dirname(os.path.abspath(__file__))
TORCH_TARGET = "0x020a000000000000"  # stable ABI of torch 2.10: the oldest runtime the build supports
DEFAULT_CUDA_ARCHS = "8.0;9.0a"
CXX_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wextra"]
ISA_FLAGS = {
    "scalar": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512vl", "-mfma", "-mf16c", "-Wno-uninitialized", "-Wno-maybe-uninitialized"],
    "avx512bf16": ["-mavx512f", "-mavx512vl", "-mavx512bf16", "-mfma", "-mf16c", "-Wno-uninitialized",
                   "-Wno-maybe-uninitialized"],
}


def log(msg):
    print(f"attnext build: {msg}", flush=True)


def compiler():
    return os.environ.get("CXX", "c++")


def compiler_accepts(flags):
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("#include <immintrin.h>\nint main() { return 0; }\n")
        cmd = [compiler(), *flags, "-c", src, "-o", os.path.join(tmp, "probe.o")]
        return subprocess.run(cmd, capture_output=True).returncode == 0


def cpu_units():
    """The vector units this compiler can build, and why the others are left out."""
    units, skipped = ["scalar"], {}
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        skipped = {u: f"not an x86 target ({platform.machine()})" for u in ("avx2", "avx512", "avx512bf16")}
        return units, skipped
    for unit in ("avx2", "avx512", "avx512bf16"):
        if compiler_accepts(ISA_FLAGS[unit]):
            units.append(unit)
        else:
            skipped[unit] = f"{compiler()} does not accept {' '.join(ISA_FLAGS[unit])}"
    return units, skipped


def cuda_plan():
    """(build the CUDA module?, reason) from torch's CUDA support, nvcc and the sources present."""
    if os.environ.get("ATTNEXT_FORCE_CPU") == "1":
        return False, "ATTNEXT_FORCE_CPU=1"
    sources = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU-only build"
    elif cpp_extension.CUDA_HOME is None or not os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")):
        reason = f"nvcc not found (CUDA_HOME={cpp_extension.CUDA_HOME}; set CUDA_HOME to a toolkit with bin/nvcc)"
    elif not sources:
        reason = "no CUDA sources in csrc/cuda"
    else:
        return True, f"torch CUDA {torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}"
    if os.environ.get("FORCE_CUDA") == "1":
        sys.exit(f"attnext build: FORCE_CUDA=1 but the CUDA module cannot be built: {reason}")
    return False, reason


class BuildExt(cpp_extension.BuildExtension):
    """Compiles the torch-free CPU kernels, one object per vector unit with that unit's flags,
    and links them into attnext._C."""

    def build_extension(self, ext):
        if ext.name == "attnext._C":
            ext.extra_objects = self.cpu_kernel_objects() + list(ext.extra_objects or [])
        super().build_extension(ext)

    def cpu_kernel_objects(self):
        units, _ = cpu_units()
        defines = [f"-DATTNEXT_HAVE_{u.upper()}" for u in units if u != "scalar"]
        includes = ["-I" + os.path.join(ROOT, "csrc", "include"), "-I" + os.path.join(ROOT, "csrc")]
        jobs = [("dispatch", [])] + [(f"attention_{u}", ISA_FLAGS[u]) for u in units]
        out_dir = os.path.join(self.build_temp, "cpu_kernels")
        os.makedirs(out_dir, exist_ok=True)
        objects, procs = [], []
        for name, flags in jobs:
            src, obj = os.path.join(ROOT, "csrc", "cpu", name + ".cpp"), os.path.join(out_dir, name + ".o")
            cmd = [compiler(), *CXX_FLAGS, *flags, *defines, *includes, "-c", src, "-o", obj]
            log(" ".join(cmd[:1] + flags + [os.path.relpath(src, ROOT)]))
            procs.append((subprocess.Popen(cmd), cmd))
            objects.append(obj)
            if len(procs) >= int(os.environ.get("MAX_JOBS", "2")):
                self._wait(procs)
        self._wait(procs)
        return objects

    @staticmethod
    def _wait(procs):
        for proc, cmd in procs:
            if proc.wait() != 0:
                sys.exit(f"attnext build: compile failed: {' '.join(cmd)}")
        procs.clear()


def write_build_info(units, skipped, cuda, cuda_reason):
    path = os.path.join(ROOT, "attnext", "_build_info.py")
    with open(path, "w") as f:
        f.write('"""Written by setup.py at build time."""\n')
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"TORCH_CUDA_VERSION = {torch.version.cuda!r}\n")
        f.write(f"PYTHON_VERSION = {platform.python_version()!r}\n")
        f.write(f"CPU_UNITS = {units!r}\n")
        f.write(f"CPU_UNITS_SKIPPED = {skipped!r}\n")
        f.write(f"CUDA_BUILT = {cuda!r}\n")
        f.write(f"CUDA_REASON = {cuda_reason!r}\n")
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS) if cuda else ""
        f.write(f"CUDA_ARCH_LIST = {archs!r}\n")


def extensions():
    units, skipped = cpu_units()
    cuda, cuda_reason = cuda_plan()
    log(f"torch {torch.__version__} (CUDA {torch.version.cuda}), Python {platform.python_version()}, "
        f"stable ABI target {TORCH_TARGET}")
    log(f"CPU module attnext._C with vector units: {', '.join(units)}")
    for unit, why in skipped.items():
        log(f"  {unit} unit not built: {why}")
    log(f"CUDA module attnext._C_cuda: {'built' if cuda else 'not built'} ({cuda_reason})")
    write_build_info(units, skipped, cuda, cuda_reason)
    defines = [("TORCH_TARGET_VERSION", TORCH_TARGET)]
    includes = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
    modules = [
        cpp_extension.CppExtension(
            "attnext._C",
            sources=["csrc/torch_ops.cpp", "csrc/torch_cpu.cpp"],
            include_dirs=includes,
            define_macros=defines,
            extra_compile_args={"cxx": ["-O3", "-fvisibility=hidden"]},
            py_limited_api=True,
        )
    ]
    if cuda:
        modules.append(cuda_extension(includes, defines))
    return modules


def cuda_extension(includes, defines):
    """attnext._C_cuda: the binding (host compiler, USE_CUDA for the stream shim) and one nvcc unit per
    head-dim bucket. TORCH_CUDA_ARCH_LIST defaults to 8.0;9.0a (A100 and H100 machine code)."""
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    sources = ["csrc/torch_cuda.cpp"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(
        os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    nvcc = ["-O3", "-std=c++17", "-lineinfo"]
    if os.environ.get("ATTNEXT_PTXAS_VERBOSE") == "1":
        nvcc.append("-Xptxas=-v")
    log(f"  CUDA archs: {os.environ['TORCH_CUDA_ARCH_LIST']}; {len(sources) - 1} nvcc units")
    return cpp_extension.CUDAExtension(
        "attnext._C_cuda",
        sources=sources,
        include_dirs=includes,
        define_macros=defines + [("USE_CUDA", None)],
        extra_compile_args={"cxx": ["-O3", "-fvisibility=hidden"], "nvcc": nvcc},
        py_limited_api=True,
    )


setup(
    packages=find_packages(include=["attnext", "attnext.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
