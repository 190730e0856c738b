"""Presenting the CPU targets: a summary, one markdown table per target with a result per row, and a plot."""

import os

from attnext.bench import machine, report

MIB = 1024 * 1024


def _result(row):
    return row["result"] + (f": {row['reason']}" if row["reason"] else "")


def _yes_no(flag):
    return "yes" if flag else "no"


def _others(row):
    return "?" if row.get("other_load") is None else f"{row['other_load']:.2f}"


def _attention_table(target, rows):
    columns = ["dtype", "B", "H", "S", "D", "causal", "mode", "threads", "reps", "attnext ms", "torch ms",
               "attnext GFLOP/s", "torch GFLOP/s", "ratio"]
    peak = target.min_peak is not None
    if peak:
        columns.append("% FMA peak per thread")
    columns.append("others")
    body = []
    for r in rows:
        cells = [r["dtype"], r["batch"], r["heads"], r["seqlen"], r["head_dim"], _yes_no(r["causal"]), r["mode"],
                 r["threads"], r["reps"], report.ms_text(r["attnext_ms"]), report.ms_text(r["peer_ms"]),
                 f"{r['attnext_rate']:.1f}", f"{r['peer_rate']:.1f}", f"{r['ratio']:.2f}"]
        if peak:
            cells.append(f"{100 * r['peak_fraction']:.1f}")
        body.append(cells + [_others(r), _result(r)])
    return report.table(columns + ["result"], body)


def _beside(row):
    if row.get("bandwidth_before_gbs") is None:
        return "header"
    return f"{row['bandwidth_before_gbs']:.1f} / {row['bandwidth_after_gbs']:.1f}"


def _cap(row):
    cap = row.get("arithmetic_cap_fraction")
    return "?" if cap is None else f"{100 * cap:.0f}"


def _again(row):
    """attnext's back-to-back calls (timing.measure(again=True)): ms and % bandwidth, not judged."""
    if row.get("attnext_again_ms") is None:
        return ["-", "-"]
    return [f"{row['attnext_again_ms']:.3f}", f"{100 * row['bandwidth_fraction_again']:.1f}"]


def _decode_table(rows):
    columns = ["dtype", "B", "Hq", "Hkv", "Sq", "Sk", "D", "K/V", "KV MiB", "threads", "reps", "attnext ms", "torch ms",
               "attnext KV GB/s", "torch KV GB/s", "bandwidth GB/s before / after", "% bandwidth",
               "% bandwidth at FMA peak", "ratio", "back to back ms", "back to back % bandwidth", "others", "result"]
    body = [[r["dtype"], r["batch"], r["heads"], r["heads_kv"], r["seq_q"], r["seq_k"], r["head_dim"],
             r.get("kv_layout", "bhsd"), f"{r['kv_bytes'] / MIB:.0f}", r["threads"], r["reps"],
             f"{r['attnext_ms']:.3f}", f"{r['peer_ms']:.3f}", f"{r['attnext_kv_gbs']:.1f}", f"{r['peer_kv_gbs']:.1f}",
             _beside(r), f"{100 * r['bandwidth_fraction']:.1f}", _cap(r), f"{r['ratio']:.2f}", *_again(r),
             _others(r), _result(r)] for r in rows]
    return report.table(columns, body)


def _threads_table(rows):
    columns = ["dtype", "B", "H", "S", "D", "mode", "reps", "1 thread ms", "2 threads ms", "speedup",
               "cores' worth before / after", "others", "result"]
    body = [[r["dtype"], r["batch"], r["heads"], r["seqlen"], r["head_dim"], r["mode"], r["reps"], f"{r['ms_1']:.2f}",
             f"{r['ms_2']:.2f}", f"{r['speedup']:.2f}", f"{r['cores_before']:.2f} / {r['cores_after']:.2f}",
             _others(r), _result(r)] for r in rows]
    return report.table(columns, body)


def _summary(the_plan, rows):
    body = []
    for target, cfgs in the_plan:
        mine = [r for r in rows if r["target"] == target.name]
        for threads in dict.fromkeys(r["threads"] for r in mine):
            judged = [r for r in mine if r["threads"] == threads and r["result"] != "not judged"]
            passed = sum(r["result"] == "pass" for r in judged)
            unsure = sum(r["result"] == "inconclusive" for r in judged)
            verdict = ("not judged" if not judged else "pass" if passed == len(judged)
                       else "inconclusive" if passed + unsure == len(judged) else "FAIL")
            busy = sum(bool(r.get("disturbed")) for r in judged)
            body.append([target.name, threads, len(judged), passed, unsure, len(judged) - passed - unsure, busy,
                         verdict])
        if not mine:
            body.append([target.name, "-", 0, 0, 0, 0, 0, "not run" if not cfgs else "not timed"])
    columns = ["target", "threads", "rows judged", "pass", "inconclusive", "FAIL", "rows disturbed", "verdict"]
    return report.table(columns, body)


def report_lines(the_plan, rows, end, reps, warmup, slow_reps, notes):
    """The lines printed after the header: timing rules, the summary, then one section per target."""
    slow = (f"; where torch's first call took over 3 s, median of {slow_reps} after that call (see reps)"
            if reps > slow_reps else "")
    lines = [f"timing: median of {reps} after {warmup} warm-up, attnext and torch SDPA interleaved{slow}; "
             "ratio = torch ms / attnext ms (> 1: attnext faster)",
             "decode: attnext.attention(q, k, v) with K/V on fewer heads as they are, torch SDPA with "
             "enable_gqa=True where Hkv < Hq, both without mask; KV GB/s = 2*B*Hkv*Sk*D*element size / time; "
             "each call takes the next of enough K/V copies to fill 128 MiB, so that it reads them from memory; "
             "% bandwidth = attnext KV GB/s / the mean of the read-bandwidth probes (x.sum() over "
             f"{machine.BANDWIDTH_MIB} MiB) run just before and after the row at its thread count; % bandwidth at FMA "
             "peak = the most of that bandwidth the row's arithmetic (4*B*Hq*Sq*Sk*D flops) allows at the per-core FMA "
             "peak times the threads (bf16: times the products per lane of attnext's CPU unit, 2 on avx512bf16); "
             "below 80 the target cannot be met on this machine; back to back: the median of attnext calls made "
             "right after each timed attnext call (on the next K/V copy), not judged: the calls the verdicts use "
             "follow a torch call, and memory reads after a pause in the memory stream are slower (docs/benchmarks.md)",
             "threads: attnext alone at 1 and 2 threads interleaved, the two-core probe run just before and after",
             "others: CPU time that other processes used, or the hypervisor stole, while the row was timed "
             f"(/proc/stat), in cores' worth; above {machine.BUSY_OTHERS} the row is disturbed: its result says so, "
             "and a failed speedup becomes inconclusive",
             "ceilings again at the end of the run (drift check; the verdicts use the header's, decode rows their own "
             "probes): "
             + machine.ceiling_summary(end)]
    lines += notes + ["", "## Summary", "", _summary(the_plan, rows)]
    for target, _ in the_plan:
        mine = [r for r in rows if r["target"] == target.name]
        if not mine:
            continue
        if target.name == "decode":
            table = _decode_table(mine)
        elif target.name == "threads":
            table = _threads_table(mine)
        else:
            table = _attention_table(target, mine)
        lines += ["", f"## {target.name}: {target.text}", "", table]
    return lines


# The plot: one panel per criterion of each target: (row key, the target's threshold field, y label).
CRITERIA = [("ratio", "min_ratio", "torch ms / attnext ms"),
            ("peak_fraction", "min_peak", "fraction of per-core FMA peak (per thread)"),
            ("bandwidth_fraction", "min_bandwidth", "KV GB/s / memory read bandwidth"),
            ("speedup", "min_speedup", "attnext 1-thread ms / 2-thread ms")]
THREAD_COLORS = {1: "#1f77b4", 2: "#ff7f0e", "1 vs 2": "#2ca02c"}


def _x_label(r):
    if r["target"] == "decode":
        return f"{r['dtype']} Hkv{r['heads_kv']} Sq{r['seq_q']} Sk{r['seq_k'] // 1024}k"
    text = f"{r['dtype']} S{r['seqlen']} D{r['head_dim']}"
    return text + (f" {r['mode']}" if r["target"] == "threads" else "")


def write_plot(path, the_plan, rows):
    """Bars of each target's criterion per config and thread count; failing bars hatched, unjudged faded."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    panels = [(t.name, key, getattr(t, field), ylabel) for t, _ in the_plan for key, field, ylabel in CRITERIA
              if getattr(t, field) is not None and any(r["target"] == t.name for r in rows)]
    most = max(len({_x_label(r) for r in rows if r["target"] == p[0]}) for p in panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(9.0, 0.45 * most + 3), 3.4 * len(panels)), squeeze=False)
    style = {"FAIL": dict(hatch="///", edgecolor="#d62728"), "inconclusive": dict(hatch="..")}
    for ax, (name, key, line, ylabel) in zip(axes[:, 0], panels):
        mine = [r for r in rows if r["target"] == name]
        labels = list(dict.fromkeys(_x_label(r) for r in mine))
        threads = list(dict.fromkeys(r["threads"] for r in mine))
        width = 0.8 / len(threads)
        for j, n in enumerate(threads):
            for r in (r for r in mine if r["threads"] == n):
                x = labels.index(_x_label(r)) + (j - (len(threads) - 1) / 2) * width
                ax.bar(x, r[key], width, color=THREAD_COLORS.get(n, "#7f7f7f"),
                       alpha=0.35 if r["result"] == "not judged" else 1.0, **style.get(r["result"], {}))
                text = f"{r[key]:.2f}" + ("*" if r.get("disturbed") else "")
                ax.annotate(text, (x, r[key]), xytext=(0, 2), textcoords="offset points", ha="center",
                            va="bottom", fontsize=5, rotation=90)
        ax.axhline(line, color="#d62728", linestyle="--", linewidth=1)
        handles = [Patch(color=THREAD_COLORS.get(n, "#7f7f7f"), label=n if n == "1 vs 2" else report.threads_text(n))
                   for n in threads]
        handles += [Patch(facecolor="white", hatch="///", edgecolor="#d62728", label="fails"),
                    Line2D([], [], color="#d62728", linestyle="--", label=f"target {line:g}")]
        ax.margins(y=0.2)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title(f"{name}: {ylabel} (faded: not judged; *: disturbed by other processes)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
