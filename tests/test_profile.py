"""python -m attnext.profile (one configuration for a profiler) and the NVTX helper, on the CPU."""

import subprocess
import sys

import pytest
import torch

import attnext
from attnext import _nvtx, profile
from attnext.reference import visible

CPU_ONLY_TORCH = torch.version.cuda is None


def run_profile(*args):
    return subprocess.run([sys.executable, "-m", "attnext.profile", *args], capture_output=True, text=True,
                          timeout=300)


TINY = ("--device", "cpu", "--batch", "1", "--heads", "4", "--kv-heads", "2", "--seq-q", "33", "--seq-k", "47",
        "--head-dim", "16", "--warmup", "1", "--iters", "2")


def test_profile_runs_one_config_on_cpu():
    proc = run_profile(*TINY, "--mode", "bwd", "--dtype", "fp32", "--causal", "bottom_right", "--layout", "bshd")
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("attnext.profile: attnext.bwd fp32 B1 H4 KV2 S33x47 D16 causal_bottom_right bshd on cpu")
    assert "2 calls after 1 warm-up" in line and "GFLOP/s" in line


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_profile_forward_in_process(dtype, capsys, restore_threads):
    assert profile.main([*TINY, "--mode", "fwd", "--dtype", dtype, "--window", "8,2", "--threads", "1"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"attnext.profile: attnext.fwd {dtype} B1 H4 KV2 S33x47 D16 window(8,2) on cpu, 1 thread:")


@pytest.mark.parametrize("args, message", [
    (("--heads", "6", "--kv-heads", "4"), "--heads 6 is not a multiple of --kv-heads 4"),
    (("--causal", "diagonal"), "invalid choice: 'diagonal' (choose from 'none', 'top_left', 'bottom_right')"),
    (("--mode", "both"), "invalid choice: 'both' (choose from 'fwd', 'bwd')"),
    (("--iters", "0"), "--iters 0 is not supported (supported: >= 1)"),
    (("--warmup", "-1"), "--warmup -1 is not supported (supported: >= 0)"),
    (("--head-dim", "x"), "--head-dim 'x' is not an integer"),
    (("--window", "4"), "--window '4' is not LEFT,RIGHT"),
    (("--causal", "top_left", "--window", "4,3"), "window_size right=3 with causal='top_left' is not supported"),
    (("--device", "tpu"), "--device 'tpu' is not supported (supported: cpu, cuda, cuda:N)"),
])
def test_profile_rejects_bad_arguments(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        profile.main(list(args))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_profile_cuda_without_a_gpu(capsys):
    with pytest.raises(SystemExit) as exit_info:
        profile.main(["--device", "cuda"])
    assert exit_info.value.code == 2 and "--device cuda: no CUDA device is visible" in capsys.readouterr().err


def test_profile_reports_op_errors_without_a_traceback(capsys):
    assert profile.main(["--device", "cpu", "--batch", "1", "--heads", "1", "--seq-q", "8", "--head-dim", "600"]) == 1
    assert capsys.readouterr().err.strip() == ("attnext.profile: attnext.attention: head_dim 600 is not supported "
                                               "on CPU (supported: 1..512)")


@pytest.mark.parametrize("causal, window", [(False, (-1, -1)), ("top_left", (-1, -1)), ("bottom_right", (-1, -1)),
                                            ("top_left", (5, -1)), ("bottom_right", (3, 0)), (False, (7, 2)),
                                            (False, (0, 0))])
@pytest.mark.parametrize("seq_q, seq_k", [(13, 13), (9, 21), (21, 9)])
def test_visible_pairs_counts_the_mask_exactly(causal, window, seq_q, seq_k):
    kind, left, right = attnext.api._mask_args("test", causal, window)
    expected = int(visible(seq_q, seq_k, causal, window).sum())
    assert profile.visible_pairs(seq_q, seq_k, kind, left, right) == expected


@pytest.mark.skipif(not CPU_ONLY_TORCH, reason="torch has CUDA: NVTX is there")
def test_nvtx_is_a_no_op_on_cpu_only_torch():
    with pytest.raises(RuntimeError):  # what the helper guards against
        torch.cuda.nvtx.range_push("x")
    assert not _nvtx.AVAILABLE
    with _nvtx.nvtx_range("attnext.fwd bf16 B1 H1 KV1 S1x1 D8 full"):
        pass
    previous = _nvtx.set_op_ranges(True)
    try:
        assert not _nvtx.op_ranges_enabled()
        q = torch.randn(1, 2, 5, 8)
        with _nvtx.op_range("attnext.fwd", q, q, 1):
            out = attnext.attention(q, q, q, causal=True)
        assert out.shape == q.shape
    finally:
        _nvtx.set_op_ranges(previous)
    assert not torch.cuda.is_initialized()


def test_nvtx_config_names():
    q = torch.empty(4, 16, 4096, 128, dtype=torch.bfloat16)
    k = torch.empty(4, 4, 4096, 128, dtype=torch.bfloat16)
    assert _nvtx.config_name("attnext.fwd", q, k, 1) == "attnext.fwd bf16 B4 H16 KV4 S4096x4096 D128 causal"
    qs, ks = torch.empty(2, 100, 8, 64, dtype=torch.float16), torch.empty(2, 300, 8, 64, dtype=torch.float16)
    assert (_nvtx.config_name("attnext.bwd", qs, ks, 3, 16, 0, bshd=True)
            == "attnext.bwd fp16 B2 H8 KV8 S100x300 D64 window(16,0) bshd")
    assert "/" not in _nvtx.config_name("attnext.fwd", q, k, 2, 8, -1)


def test_nvtx_import_does_not_touch_cuda():
    code = ("import torch\n"
            "import attnext._nvtx, attnext.profile\n"
            "assert not torch.cuda.is_initialized()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_op_range_inside_torch_compile():
    def f(q, k, v):
        with _nvtx.op_range("attnext.fwd", q, k, 1):
            return attnext.attention(q, k, v, causal=True)

    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(q, k, v), f(q, k, v))
