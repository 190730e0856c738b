"""The GPU tooling that can be checked without a GPU: scripts/gpu_check.sh degrading cleanly, its summary,
the benchmark's backward-only mode and time limit, the fat-binary reader, and attnext.info's GPU report."""

import json
import os
import pathlib
import struct
import subprocess
import sys
import types

import pytest
import torch

from attnext import _fatbin, info
from attnext.bench import check, configs, gpu_check

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def test_gpu_check_script_parses():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_gpu_check_without_a_gpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    stages = {s["name"]: s for s in record["stages"]}
    assert stages["gpu"]["status"] == "skipped" and stages["info"]["status"] == "ok"
    for name in ("pytest", "sanitizer-memcheck", "bench"):
        assert stages[name]["status"] == "skipped" and stages[name]["note"] == "skipped: no GPU"
    assert record["exit_code"] == 2 and record["info"]["self_test"]["ok"]
    last = proc.stdout.strip().splitlines()
    assert last[-6].startswith("stage") and "exit 2: no GPU" in last[-7]


def _bench(tmp_path, *args):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "attnext.bench", "--shapes", "2,2,64,16;1,2,128,16", "--reps", "1",
                           "--warmup", "0", "--dtypes", "float32", "--json", str(out), *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


def test_summary_of_stages_tests_and_bench(tmp_path):
    _bench(tmp_path, "--modes", "fwd,bwd")
    (tmp_path / "pytest.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_cuda" name="test_a"/>'
        '<testcase classname="tests.test_cuda" name="test_b"><failure message="assert 2 &lt;= 1">trace</failure>'
        '</testcase><testcase classname="tests.test_cuda" name="test_c"><skipped/></testcase></testsuite>'
        '</testsuites>')
    (tmp_path / "sanitizer-memcheck.log").write_text("ok   fp16 ...\ngrid: 24 cases, 0 failed\n"
                                                     "========= ERROR SUMMARY: 0 errors\n")
    rows = [("gpu", "ok", "0", "3", "NVIDIA H100", ""), ("info", "ok", "0", "6", "", ""),
            ("pytest", "FAIL", "1", "20", "", str(tmp_path / "pytest.log")),
            ("sanitizer-memcheck", "ok", "0", "30", "", str(tmp_path / "sanitizer-memcheck.log")),
            ("bench", "ok", "0", "90", "", "")]
    (tmp_path / "pytest.log").write_text("F.s\nFAILED tests/test_cuda.py::test_b - assert 2 <= 1\n")
    (tmp_path / "stages.tsv").write_text("".join("\t".join(r) + "\n" for r in rows))
    text, code = gpu_check.summarize(str(tmp_path))
    assert code == 1
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    assert record["pytest"]["passed"] == 1 and record["pytest"]["failed"][0]["test"] == "tests.test_cuda::test_b"
    notes = {s["name"]: s["summary"] for s in record["stages"]}
    assert notes["pytest"] == "1 passed, 1 failed, 0 errors, 1 skipped"
    assert notes["sanitizer-memcheck"] == "ERROR SUMMARY: 0 errors; grid: 24 cases, 0 failed"
    assert notes["bench"] == "check 8/8; 8 configs timed"
    bench = record["bench"]
    assert bench["seqlens"] == [64, 128] and bench["peers"] == ["sdpa"]
    assert [row[:3] for row in bench["tables"]["sdpa"]] == [["fwd", 16, "no"], ["fwd", 16, "yes"],
                                                            ["bwd", 16, "no"], ["bwd", 16, "yes"]]
    assert "FAILED tests/test_cuda.py::test_b" in text and "ratio sdpa ms / attnext ms" in text
    assert text.splitlines()[-1].startswith("bench") and len(text) < 12000


def test_bench_backward_mode_and_time_limit(tmp_path):
    record = _bench(tmp_path, "--modes", "bwd", "--time-limit", "0.001", "--causal", "no")
    assert record["modes"] == ["bwd"] and record["time_limit"] == 0.001
    assert record["results"] == []  # the correctness check alone outlasts the limit
    assert [(s["peer"], s["reason"]) for s in record["skipped"]] == [("all", "--time-limit 0.001 s reached")] * 2
    assert [c["mode"] for c in record["check"]] == ["fwdbwd"] * 2


def test_backward_flops_and_gpu_suite_modes():
    fwd = configs.attention_flops(1, 2, 64, 64, 16, False, "fwd")
    assert configs.attention_flops(1, 2, 64, 64, 16, False, "bwd") == 2.5 * fwd
    assert configs.SUITE_MODES["gpu"] == ("fwd", "bwd")
    shapes = configs.SUITES["gpu"][0]
    assert all(b * s == 16384 and h * d == 2048 for b, h, s, d in shapes) and len(shapes) == 18
    cfg = configs.Config(torch.bfloat16, 1, 2, 64, 16, True, "bwd")
    assert check.small_case(cfg)[-1] == "fwdbwd"


def _fatbin_blob(entries):
    """A fat binary as nvcc lays it out: a 16-byte header, then entries with a 64-byte header each."""
    body = b""
    for kind, arch, flags, payload in entries:
        header = struct.pack("<HHIQ", kind, 0x101, 64, len(payload)) + b"\0" * 12 + struct.pack("<I", arch)
        header += b"\0" * 8 + struct.pack("<I", flags)
        body += header.ljust(64, b"\0") + payload
    return struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body


def test_fatbin_archs(tmp_path):
    blob = _fatbin_blob([(2, 80, 0x11, b"x" * 32), (2, 90, 0x100011, b"y" * 16), (1, 90, 0x8011, b"z" * 8)])
    lib = tmp_path / "lib.so"
    lib.write_bytes(b"\x7fELF" + b"\0" * 100 + blob + b"\0" * 7 + _fatbin_blob([(2, 100, 0x1200011, b"w")]))
    found = _fatbin.archs(str(lib))
    assert found == {"sass": ["sm_80", "sm_90a", "sm_100f"], "ptx": ["compute_90"]}
    assert _fatbin.runs_on(found, 9, 0) == "sm_90a SASS"
    assert _fatbin.runs_on(found, 8, 9) == "sm_80 SASS"
    assert _fatbin.runs_on(found, 10, 3) == "sm_100f SASS"
    assert _fatbin.runs_on(found, 12, 0).startswith("compute_90 PTX")
    assert _fatbin.runs_on({"sass": ["sm_90a"], "ptx": []}, 10, 0) is None


def test_info_reports_gpus(monkeypatch):
    props = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0, total_memory=80 * 2**30,
                                  multi_processor_count=132, L2_cache_size=50 * 2**20,
                                  shared_memory_per_block_optin=227 * 2**10,
                                  shared_memory_per_multiprocessor=228 * 2**10, regs_per_multiprocessor=65536)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_90"])
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91900)
    monkeypatch.setattr(info, "cuda_module_archs",
                        lambda: {"path": "attnext/_C_cuda.abi3.so", "sass": ["sm_90a"], "ptx": []})
    g = info.gpu_info()
    assert g["devices"][0]["attnext_code"] == "sm_90a SASS" and g["devices"][0]["l2_cache_mib"] == 50.0
    text = info.format_text({**info.collect(run_self_test=False), "gpu": g})
    assert "attnext CUDA module holds: sm_90a" in text
    assert "cuda:0: NVIDIA H100 80GB HBM3, compute capability 9.0, 80.0 GiB, 132 SMs, L2 50.0 MiB" in text
    assert "attnext code for it: sm_90a SASS" in text


def test_info_without_a_cuda_module():
    module = info.cuda_module_archs()
    if module["path"] is None:
        assert module == {"path": None, "sass": [], "ptx": []}
    else:
        assert module["sass"] or module["ptx"]
