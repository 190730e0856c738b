"""The user's first commands, python -m attnext.bench and python -m attnext.info, on a tiny workload."""

import json
import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)


def test_bench_checks_times_and_saves(tmp_path):
    out = tmp_path / "bench.json"
    proc = run("attnext.bench", "--shapes", "1,2,96,16", "--reps", "1", "--warmup", "0", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "ratio" in proc.stdout
    rows = json.loads(out.read_text())
    assert "machine" in json.dumps(rows) and "attnext" in json.dumps(rows)


def test_bench_table_keeps_three_digits_of_short_calls():
    """A call of a few microseconds is not printed as 0.00 or 0.01 ms: the table's ratio must be checkable."""
    from attnext.bench.report import ms_text

    cases = {0.00941: "0.00941", 0.038: "0.0380", 0.21: "0.210", 0.448: "0.448", 1.0: "1.00", 13.046: "13.05"}
    assert {ms: ms_text(ms) for ms in cases} == cases


def test_bench_rejects_a_bad_mode():
    proc = run("attnext.bench", "--modes", "sideways")
    assert proc.returncode != 0 and "mode" in proc.stderr


def test_info_reports_the_build_and_passes_its_self_test():
    proc = run("attnext.info", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert "ok" in json.dumps(info).lower()


def test_info_names_device_properties_torch_does_not_report():
    """Where torch lacks a device property, the text says so instead of printing None."""
    from attnext import info as info_module

    info = info_module.collect(run_self_test=False)
    info["gpu"]["devices"] = [{"index": 0, "name": "Test GPU", "capability": "9.0", "memory_gib": 80.0,
                               "multiprocessors": 132, "l2_cache_mib": None,
                               "shared_memory_per_block_optin_kib": 227.0, "shared_memory_per_sm_kib": None,
                               "registers_per_sm": None, "clock_mhz": None}]
    line = next(l for l in info_module.format_text(info).splitlines() if l.strip().startswith("cuda:0"))
    assert "None" not in line
    assert "L2 unknown" in line and "227.0 KiB per block (unknown per SM)" in line and "unknown per SM" in line


def test_cpu_suite_judges_decode_rows_against_probes_beside_them(tmp_path):
    out = tmp_path / "decode.md"
    proc = run("attnext.bench", "--suite", "cpu", "--targets", "decode", "--decode-shapes", "1,4,2,1,64,16",
               "--dtypes", "fp32", "--threads", "1", "--reps", "1", "--warmup", "0", "--markdown", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "bandwidth GB/s before / after" in out.read_text()
    assert "back to back ms" in out.read_text()


def test_decode_rows_also_time_attnext_back_to_back():
    """measure(again=True) times a second attnext call right after each timed one: A, A', B per round."""
    import torch

    from attnext.bench import configs, targets, timing

    cfg = configs.DecodeConfig(torch.float32, 1, 4, 2, 1, 64, 16)
    timings, _ = timing.measure(cfg, torch.device("cpu"), reps=3, warmup=2, again=True)
    assert len(timings[timing.AGAIN]["samples_ms"]) == len(timings["attnext"]["samples_ms"]) == 3
    assert timing.AGAIN not in timing.measure(cfg, torch.device("cpu"), reps=1, warmup=0)[0]
    header = {"bandwidth_gbs": {1: 100.0}, "fma_peak_gflops": 100.0}
    big = configs.DecodeConfig(torch.float32, 1, 4, 2, 1, 1000, 125)  # 2 MB of K/V
    row = targets.add_ceiling_fields(dict(threads=1, attnext_ms=0.1, peer_ms=0.2, attnext_again_ms=0.05), big, header)
    assert row["attnext_again_kv_gbs"] == 40.0 and row["bandwidth_fraction_again"] == 0.4
    assert row["bandwidth_fraction"] == 0.2  # the verdict's figure stays the interleaved call's


def test_cpu_suite_times_decode_on_key_major_kv(tmp_path):
    out = tmp_path / "decode.json"
    proc = run("attnext.bench", "--suite", "cpu", "--targets", "decode", "--decode-shapes", "1,4,2,1,64,16",
               "--decode-layout", "bshd", "--dtypes", "fp32", "--threads", "1", "--reps", "1", "--warmup", "0",
               "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    record = json.loads(out.read_text())
    assert record["decode_layout"] == "bshd" and [r["kv_layout"] for r in record["rows"]] == ["bshd"]
    assert "| bshd " in proc.stdout  # the K/V column of the decode table
    proc = run("attnext.bench", "--decode-layout", "bshd")
    assert proc.returncode != 0 and "--decode-layout belong to --suite cpu" in proc.stderr


def test_key_major_decode_case_is_a_view_of_key_major_memory():
    import torch

    from attnext.bench import configs, timing

    case = timing.Case(configs.DecodeConfig(torch.float32, 1, 4, 2, 1, 64, 16, kv_layout="bshd"), torch.device("cpu"))
    k, v = case.kvs[0]
    assert k.shape == (1, 2, 64, 16) and k.stride() == (64 * 2 * 16, 16, 2 * 16, 1) and v.stride() == k.stride()


def test_decode_fraction_uses_the_mean_of_the_probes_beside_the_row():
    import torch

    from attnext.bench import configs, targets

    cfg = configs.DecodeConfig(torch.float32, 1, 4, 2, 1, 1000, 125)  # 2 * 2 * 1000 * 125 * 4 = 2 MB of K/V
    header = {"bandwidth_gbs": {1: 100.0}, "fma_peak_gflops": 100.0}
    decode = targets.TARGETS["decode"]
    row = targets.add_ceiling_fields(dict(threads=1, attnext_ms=0.1, peer_ms=0.2, bandwidth_before_gbs=20.0,
                                          bandwidth_after_gbs=30.0), cfg, header)
    assert row["attnext_kv_gbs"] == 20.0 and row["bandwidth_gbs"] == 25.0 and row["bandwidth_fraction"] == 0.8
    assert targets.verdict(decode, dict(row, seqlen=1, disturbed=False, other_load=0.0))[0] == "pass"
    row = targets.add_ceiling_fields(dict(threads=1, attnext_ms=0.1, peer_ms=0.2), cfg, header)
    assert row["bandwidth_gbs"] == 100.0 and row["bandwidth_fraction"] == 0.2


def test_decode_rows_bound_by_the_arithmetic_say_so():
    """16 query rows per K/V row do 8 flops per fp32 byte: at 100 GFLOP/s a core reads at most 12.5 GB/s,
    62.5% of 20 GB/s, which the FAIL names; bf16 has half the bytes and, on vdpbf16ps, twice the rate."""
    import torch

    from attnext.bench import configs, targets

    header = {"bandwidth_gbs": {1: 20.0, 2: 20.0}, "fma_peak_gflops": 100.0, "bf16_products_per_lane": 2}
    decode = targets.TARGETS["decode"]
    for dtype in (torch.float32, torch.bfloat16):
        cfg = configs.DecodeConfig(dtype, 1, 32, 8, 4, 8192, 128)
        row = targets.add_ceiling_fields(dict(threads=1, attnext_ms=10.0, peer_ms=20.0), cfg, header)
        assert abs(row["arithmetic_cap_fraction"] - 0.625) < 1e-12
        result, reason = targets.verdict(decode, dict(row, seqlen=1, disturbed=False, other_load=0.0))
        assert result == "FAIL" and "(the FMA peak allows 62%)" in reason
        two = targets.add_ceiling_fields(dict(threads=2, attnext_ms=10.0, peer_ms=20.0), cfg, header)
        assert two["arithmetic_cap_fraction"] == 1.0
    one_row = configs.DecodeConfig(torch.float32, 1, 32, 32, 1, 8192, 128)  # 0.5 flops per byte
    row = targets.add_ceiling_fields(dict(threads=1, attnext_ms=100.0, peer_ms=20.0), one_row, header)
    assert row["arithmetic_cap_fraction"] == 1.0
    result, reason = targets.verdict(decode, dict(row, seqlen=1, disturbed=False, other_load=0.0))
    assert result == "FAIL" and "FMA peak" not in reason


def test_bench_calls_times_each_entry_point_warm_and_cold(tmp_path):
    out = tmp_path / "calls.json"
    proc = run("attnext.bench", "--calls", "--dtypes", "float32", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["calls"]
    entries = {"attention", "sdpa drop-in", "flash_attn_func", "torch sdpa"}
    assert {r["entry"] for r in rows} == entries and {r["seq_k"] for r in rows} == {16, 1024}
    assert all(r["warm_us"] > 0 and r["cold_us"] > 0 for r in rows)
    assert all(r["warm_ratio"] == 1.0 for r in rows if r["entry"] == "torch sdpa")
    assert "cold" in proc.stdout and "flash_attn_func" in proc.stdout
