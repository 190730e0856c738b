"""Presenting results: the header, markdown tables, the JSON record and the bar chart."""

import json
import math
import os

MIB = 1024 * 1024


def threads_text(n):
    return f"{n} thread" + ("" if n == 1 else "s")


def rate_unit(device_type):
    """GFLOP/s on CPU, TFLOP/s on GPU: (label, divisor from FLOP/s)."""
    return ("TFLOP/s", 1e12) if device_type == "cuda" else ("GFLOP/s", 1e9)


def header_lines(machine, device, args_text):
    m = machine
    cores = f"{m['logical_cpus']} logical CPUs" + (f" ({m['usable_cpus']} usable)" if m.get("usable_cpus") else "")
    lines = [
        f"machine: {m['cpu_model']}, {cores}, {m['platform']}",
        f"versions: torch {m['torch']}, Python {m['python']}, attnext {m['attnext']} "
        f"(CPU unit {m['cpu_unit']}; runnable: {', '.join(m['cpu_units_runnable'])})",
        f"device: {device}" + (f" ({m['gpu']})" if m.get("gpu") else "")
        + ("" if m["cuda_module_error"] is None else "; attnext CUDA module not loaded"),
        f"run: {args_text}",
    ]
    return lines


def table(columns, rows):
    """A markdown table with columns padded to a common width."""
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) if rows else len(str(c))
              for i, c in enumerate(columns)]
    aligns = ["<" if i == 0 or not _numeric(rows, i) else ">" for i in range(len(columns))]

    def line(cells):
        return "| " + " | ".join(f"{str(c):{a}{w}}" for c, a, w in zip(cells, aligns, widths)) + " |"
    rule = "|" + "|".join(("-" * (w + 1) + ":") if a == ">" else ("-" * (w + 2)) for a, w in zip(aligns, widths)) + "|"
    return "\n".join([line(columns), rule] + [line(r) for r in rows])


def _numeric(rows, i):
    try:
        for r in rows:
            float(str(r[i]).rstrip("x"))
        return True
    except ValueError:
        return False


def ms_text(ms):
    """Milliseconds with two decimals, or three significant digits below 1 ms (a 16-key call takes 0.0X ms)."""
    return f"{ms:.2f}" if ms >= 1 else f"{ms:#.3g}"


def timing_table(results, device_type):
    unit, _ = rate_unit(device_type)
    columns = ["device", "dtype", "B", "H", "S", "D", "causal", "mode", "threads", "peer", "attnext ms", "peer ms",
               f"attnext {unit}", f"peer {unit}", "ratio"]
    rows = [[r["device"], r["dtype"], r["batch"], r["heads"], r["seqlen"], r["head_dim"],
             "yes" if r["causal"] else "no", r["mode"], r["threads"], r["peer"], ms_text(r["attnext_ms"]),
             ms_text(r["peer_ms"]), f"{r['attnext_rate']:.1f}", f"{r['peer_rate']:.1f}", f"{r['ratio']:.2f}"]
            for r in results]
    return table(columns, rows)


def memory_table(rows):
    columns = ["device", "dtype", "B", "H", "S", "D", "causal", "mode", "threads", "attnext extra MiB",
               "sdpa extra MiB", "ratio"]
    body = [[r["device"], r["dtype"], *r["shape"], "yes" if r["causal"] else "no", r["mode"], r["threads"],
             f"{r['attnext_extra_bytes'] / MIB:.1f}", f"{r['sdpa_extra_bytes'] / MIB:.1f}", f"{r['ratio']:.2f}"]
            for r in rows]
    return table(columns, body)


def summary_lines(results):
    """Geometric mean of the ratios per peer, mode and thread count."""
    lines = []
    for peer, mode, threads in dict.fromkeys((r["peer"], r["mode"], r["threads"]) for r in results):
        ratios = [r["ratio"] for r in results if (r["peer"], r["mode"], r["threads"]) == (peer, mode, threads)]
        geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
        lines.append(f"vs {peer}, {mode}, {threads_text(threads)}: geometric mean ratio "
                     f"{geo:.2f} over {len(ratios)} configs (attnext faster in {sum(x > 1 for x in ratios)})")
    return lines


def write_text(path, text):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")


def write_json(path, record):
    write_text(path, json.dumps(record, indent=1))


def write_plot(path, results, device_type):
    """Grouped bars of the FLOP rate per config, attnext beside each peer; one panel per (mode, threads)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit, _ = rate_unit(device_type)
    panels = list(dict.fromkeys((r["mode"], r["threads"]) for r in results))
    peers = list(dict.fromkeys(r["peer"] for r in results))
    names = ["attnext"] + peers
    colors = dict(zip(names, ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b"]))
    most = max(len({_config_key(r) for r in results if (r["mode"], r["threads"]) == p}) for p in panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 0.55 * most * len(names) + 2), 3.6 * len(panels)),
                             squeeze=False)
    for ax, (mode, threads) in zip(axes[:, 0], panels):
        rows = [r for r in results if (r["mode"], r["threads"]) == (mode, threads)]
        keys = list(dict.fromkeys(_config_key(r) for r in rows))
        values = {name: [None] * len(keys) for name in names}
        for r in rows:
            i = keys.index(_config_key(r))
            values["attnext"][i] = r["attnext_rate"]
            values[r["peer"]][i] = r["peer_rate"]
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(keys))]
            ys = [0.0 if y is None else y for y in values[name]]
            ax.bar(xs, ys, width, label=name, color=colors.get(name))
        for r in rows:  # the ratio against each peer above that peer's bar
            i, j = keys.index(_config_key(r)), names.index(r["peer"])
            ax.annotate(f"{r['ratio']:.2f}x", (i + (j - (len(names) - 1) / 2) * width, r["peer_rate"]),
                        xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=6)
        ax.margins(y=0.12)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([_config_label(k) for k in keys], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(unit)
        ax.set_title(f"{mode}, {threads_text(threads)} ({rows[0]['device']}); "
                     "labels: peer time / attnext time", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _config_key(r):
    return (r["dtype"], r["batch"], r["heads"], r["seqlen"], r["head_dim"], r["causal"])


def _config_label(key):
    dtype, b, h, s, d, causal = key
    return f"{dtype} {b}x{h}x{s}x{d}" + (" causal" if causal else "")
