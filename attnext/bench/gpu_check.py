"""Helpers of scripts/gpu_check.sh.

  python -m attnext.bench.gpu_check grid           a small forward + backward grid for compute-sanitizer
  python attnext/bench/gpu_check.py summarize OUT  gathers OUT's stage results into OUT/gpu_check.json and
                                                   prints the summary (standard library only, so that it
                                                   works even when attnext cannot be imported); the exit
                                                   status it records is the script's (0, 1 or 2)
"""

import json
import math
import os
import statistics
import sys
import xml.etree.ElementTree as ET

# The sanitizer grid: odd sizes (tails in every tile), GQA, Sq > Sk (fully masked rows with bottom-right causal).
GRID_SHAPES = ((1, 4, 2, 77, 131), (2, 2, 2, 129, 65))  # (B, Hq, Hkv, Sq, Sk)
GRID_HEAD_DIMS = (64, 128)
GRID_MASKS = (False, "top_left", "bottom_right")
TAIL_LINES = 12
TAIL_CHARS = 2500


def grid():
    """Forward and backward on every case of the grid, on CUDA; returns the number of cases that raised."""
    import torch

    import attnext

    failed = cases = 0
    for dtype in (torch.float16, torch.bfloat16):
        for d in GRID_HEAD_DIMS:
            for b, hq, hkv, sq, sk in GRID_SHAPES:
                for causal in GRID_MASKS:
                    cases += 1
                    label = f"{str(dtype).replace('torch.', '')} B{b} H{hq} KV{hkv} S{sq}x{sk} D{d} causal={causal}"
                    try:
                        q = torch.randn(b, hq, sq, d, device="cuda", dtype=dtype, requires_grad=True)
                        k, v = (torch.randn(b, hkv, sk, d, device="cuda", dtype=dtype, requires_grad=True)
                                for _ in range(2))
                        out = attnext.attention(q, k, v, causal=causal)
                        out.backward(torch.randn_like(out))
                        torch.cuda.synchronize()
                        finite = all(bool(torch.isfinite(t).all()) for t in (out, q.grad, k.grad, v.grad))
                        print(f"{'ok  ' if finite else 'NaN '} {label}", flush=True)
                        failed += not finite
                    except RuntimeError as exc:
                        print(f"FAIL {label}: {str(exc).splitlines()[0]}", flush=True)
                        failed += 1
    print(f"grid: {cases} cases, {failed} failed", flush=True)
    return failed


def _read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _json(path):
    text = _read(path)
    try:
        return None if text is None else json.loads(text)
    except ValueError:
        return None


def read_stages(out):
    """The rows scripts/gpu_check.sh appended to OUT/stages.tsv: name, status, rc, seconds, note, log."""
    stages = []
    for line in (_read(os.path.join(out, "stages.tsv")) or "").splitlines():
        fields = line.split("\t") + [""] * 6
        name, status, rc, seconds, note, log = fields[:6]
        stages.append({"name": name, "status": status, "rc": int(rc) if rc.lstrip("-").isdigit() else None,
                       "seconds": int(seconds) if seconds.isdigit() else None, "note": note, "log": log or None})
    return stages


def pytest_summary(path):
    """Counts and failures from a JUnit XML file, or None."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in root.iter("testcase"):
        for tag in ("failure", "error"):
            node = case.find(tag)
            if node is not None:
                message = (node.get("message") or node.text or "").strip().splitlines()
                failed.append({"test": f"{case.get('classname', '')}::{case.get('name', '')}", "kind": tag,
                               "message": message[0][:300] if message else ""})
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": failed}


def sanitizer_summary(text):
    """The sanitizer's SUMMARY lines and the grid's last line, from its log."""
    if text is None:
        return None
    lines = [line.strip("= ").strip() for line in text.splitlines()]
    return {"summary": [line for line in lines if "SUMMARY:" in line],
            "grid": next((line for line in reversed(lines) if line.startswith("grid:")), None)}


def bench_summary(record):
    """Counts and the attnext-rate and ratio matrices of a python -m attnext.bench JSON record."""
    if record is None:
        return None
    rows = record.get("results", [])
    checks = record.get("check", [])
    seqlens = sorted({r["seqlen"] for r in rows})
    keys = sorted({(r["mode"], r["head_dim"], r["causal"]) for r in rows},
                  key=lambda k: (["fwd", "bwd", "fwdbwd"].index(k[0]) if k[0] in ("fwd", "bwd", "fwdbwd") else 9,
                                 k[1], k[2]))
    peers = list(dict.fromkeys(r["peer"] for r in rows))
    cells = {(r["mode"], r["head_dim"], r["causal"], r["seqlen"], r["peer"]): r for r in rows}

    def matrix(value):
        return [[k[0], k[1], "yes" if k[2] else "no"] + [value(k, s) for s in seqlens] for k in keys]

    def rate(k, s):
        found = [cells[(*k, s, p)]["attnext_rate"] for p in peers if (*k, s, p) in cells]
        return statistics.median(found) if found else None

    tables = {"attnext": matrix(rate)}
    for peer in peers:
        tables[peer] = matrix(lambda k, s, p=peer: cells[(*k, s, p)]["ratio"] if (*k, s, p) in cells else None)
    geo = {}
    for peer in peers:
        ratios = [r["ratio"] for r in rows if r["peer"] == peer and r["ratio"] > 0]
        geo[peer] = math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None
    not_timed = [s for s in record.get("skipped", []) if s.get("peer") == "all"]
    peer_skips = [s for s in record.get("skipped", []) if s.get("peer") != "all"]
    return {"configs": len({k[:4] for k in cells}), "check_passed": sum(bool(c.get("ok")) for c in checks),
            "check_cases": len(checks), "seqlens": seqlens, "peers": peers, "tables": tables,
            "geometric_mean_ratio": geo, "not_timed": len(not_timed), "peer_skips": len(peer_skips),
            "device": record.get("machine", {}).get("gpu") or record.get("device"),
            "unit": "TFLOP/s" if str(record.get("device", "")).startswith("cuda") else "GFLOP/s"}


def _cell(value, digits):
    return "-" if value is None else f"{value:.{digits}f}"


def _matrix_text(title, table, seqlens, digits):
    head = f"{'mode':<6} {'D':>3} {'causal':<6} |" + "".join(f"{s:>7}" for s in seqlens)
    lines = [title, head, "-" * len(head)]
    for row in table:
        lines.append(f"{row[0]:<6} {row[1]:>3} {row[2]:<6} |" + "".join(f"{_cell(v, digits):>7}" for v in row[3:]))
    return lines


def _tail(path):
    text = _read(path) or ""
    lines = [line[:200] for line in text.splitlines() if line.strip()][-TAIL_LINES:]
    return "\n".join(lines)[-TAIL_CHARS:]


def _stage_note(stage, results):
    if stage["note"]:
        return stage["note"]
    name = stage["name"]
    if name == "info":
        info = results.get("info") or {}
        test = info.get("self_test") or {}
        return "self-test " + ("ok" if test.get("ok") else f"FAILED: {test.get('error')}") if test else ""
    if name == "pytest" and results.get("pytest"):
        p = results["pytest"]
        return f"{p['passed']} passed, {p['failures']} failed, {p['errors']} errors, {p['skipped']} skipped"
    if name.startswith("sanitizer") and results.get(name):
        s = results[name]
        return "; ".join(s["summary"] + ([s["grid"]] if s["grid"] else [])) or "no summary in the log"
    if name == "bench" and results.get("bench"):
        b = results["bench"]
        return (f"check {b['check_passed']}/{b['check_cases']}; {b['configs']} configs timed"
                + (f", {b['not_timed']} not timed (time limit)" if b["not_timed"] else ""))
    return ""


def summarize(out):
    """Writes OUT/gpu_check.json and OUT/summary.txt; returns (summary text, exit code)."""
    stages = read_stages(out)
    results = {"info": _json(os.path.join(out, "info.json")),
               "pytest": pytest_summary(os.path.join(out, "pytest.xml")),
               "bench": bench_summary(_json(os.path.join(out, "bench.json")))}
    for stage in stages:
        if stage["name"].startswith("sanitizer") and stage["log"]:
            results[stage["name"]] = sanitizer_summary(_read(stage["log"]))
    for stage in stages:
        stage["summary"] = _stage_note(stage, results)
    failed = [s for s in stages if s["status"] in ("FAIL", "timeout")]
    no_gpu = any(s["name"] == "gpu" and s["status"] == "skipped" for s in stages)
    exit_code = 1 if failed else 2 if no_gpu else 0
    lines = []
    for stage in failed:
        if stage["log"]:
            lines += [f"--- {stage['name']} ({stage['status']}, exit {stage['rc']}): last lines of {stage['log']}",
                      _tail(stage["log"])]
    if results["pytest"] and results["pytest"]["failed"]:
        lines.append("--- failed tests")
        lines += [f"{f['test']}: {f['message'][:160]}" for f in results["pytest"]["failed"][:10]]
    bench = results["bench"]
    if bench and bench["tables"]["attnext"]:
        lines += [""] + _matrix_text(f"attnext {bench['unit']} on {bench['device']}", bench["tables"]["attnext"],
                                     bench["seqlens"], 1)
        for peer in bench["peers"]:
            geo = bench["geometric_mean_ratio"][peer]
            lines += [""] + _matrix_text(f"ratio {peer} ms / attnext ms (> 1: attnext faster; geometric mean "
                                         f"{_cell(geo, 2)})", bench["tables"][peer], bench["seqlens"], 2)
    lines += ["", f"gpu_check summary ({out}; exit {exit_code}: "
              + {0: "all stages passed", 1: "a stage failed", 2: "no GPU, GPU stages skipped"}[exit_code] + ")"]
    lines.append(f"{'stage':<18} {'status':<8} {'exit':>4} {'s':>4}  note")
    for s in stages:
        rc = "" if s["rc"] is None else s["rc"]
        seconds = "" if s["seconds"] is None else s["seconds"]
        lines.append(f"{s['name']:<18} {s['status']:<8} {rc!s:>4} {seconds!s:>4}  {s['summary'][:150]}")
    text = "\n".join(lines)
    record = {"exit_code": exit_code, "stages": stages, **results}
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(record, f, indent=1)
    with open(os.path.join(out, "summary.txt"), "w") as f:
        f.write(text + "\n")
    return text, exit_code


def main(argv):
    if argv[:1] == ["grid"] and len(argv) == 1:
        return 1 if grid() else 0
    if argv[:1] == ["summarize"] and len(argv) == 2:
        text, _ = summarize(argv[1])
        print(text, flush=True)
        return 0
    print("usage: python -m attnext.bench.gpu_check grid | python attnext/bench/gpu_check.py summarize OUT",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
