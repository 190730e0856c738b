"""The layering rule of the design: the kernel contract (csrc/include) and the CPU kernels (csrc/cpu) include
no torch, ATen, c10 or CUDA-runtime header; only csrc/torch_* files do."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TORCH_FREE_DIRS = ("csrc/include", "csrc/cpu")
SOURCE_SUFFIXES = {".h", ".hpp", ".cuh", ".c", ".cc", ".cpp", ".cxx", ".inl"}
INCLUDE = re.compile(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', re.MULTILINE)
FORBIDDEN = re.compile(
    r"^(torch|ATen|c10|caffe2)/"                                     # torch and its libraries
    r"|^(cuda|cuda_runtime|cuda_runtime_api|cuda_fp16|cuda_bf16|cudaTypedefs|driver_types|vector_types|"
    r"device_launch_parameters|cuda_pipeline|cooperative_groups)\.h$"  # the CUDA runtime and its types
    r"|^(cublas|cudnn|cusparse|nvrtc|cub/|thrust/|cute/|cutlass/)"       # CUDA libraries
    r"|^(torch/extension|Python)\.h$"
)


def forbidden_includes(text):
    return [name for name in INCLUDE.findall(text) if FORBIDDEN.search(name)]


def _sources():
    files = []
    for d in TORCH_FREE_DIRS:
        files += [p for p in sorted((ROOT / d).rglob("*")) if p.suffix in SOURCE_SUFFIXES]
    return files


def test_scanner_catches_forbidden_includes():
    text = ('#include <torch/csrc/stable/library.h>\n  # include "ATen/ATen.h"\n#include <c10/util/Half.h>\n'
            '#include <cuda_runtime.h>\n#include <cuda_fp16.h>\n#include <cstdint>\n#include "attnext/mask.h"\n'
            '#include <immintrin.h>\n')
    assert forbidden_includes(text) == ["torch/csrc/stable/library.h", "ATen/ATen.h", "c10/util/Half.h",
                                        "cuda_runtime.h", "cuda_fp16.h"]


def test_torch_free_dirs_exist():
    assert _sources(), f"no sources found under {TORCH_FREE_DIRS}"
    assert any(p.name == "mask.h" for p in _sources())


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_torch_or_cuda_runtime_includes(path):
    bad = forbidden_includes(path.read_text(errors="replace"))
    assert not bad, f"{path.relative_to(ROOT)} includes {bad}: csrc/include and csrc/cpu must stay torch- and " \
                    "CUDA-runtime-free (only csrc/torch_* include torch)"
