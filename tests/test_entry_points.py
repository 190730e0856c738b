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


def test_bench_rejects_a_bad_mode():
    proc = run("attnext.bench", "--modes", "sideways")
    assert proc.returncode != 0 and "mode" in proc.stderr


def test_info_reports_the_build_and_passes_its_self_test():
    proc = run("attnext.info", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert "ok" in json.dumps(info).lower()
