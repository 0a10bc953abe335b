"""``eval.json``, ``eval.md`` (one row per task metric, one column per model) and ``eval.png``."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

HIDDEN = ("n", "seed", "queries", "depths", "subjects")
HIDDEN_PREFIX = ("loss@", "tokens@", "windows@", "stride@")


def headline(metrics: dict) -> dict[str, float]:
    """The metrics shown in the table and plot (no stderr, counts or settings)."""
    return {
        k: v for k, v in metrics.items()
        if isinstance(v, (int, float)) and k not in HIDDEN and not k.endswith("_stderr") and not k.startswith(HIDDEN_PREFIX)
    }


def rows(results: dict[str, dict[str, dict]]) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    for per_task in results.values():
        for task, metrics in per_task.items():
            for key in headline(metrics):
                if (task, key) not in seen:
                    seen.append((task, key))
    return seen


def _fmt(metrics: dict | None, key: str) -> str:
    if not metrics or key not in metrics:
        return "–"
    v = metrics[key]
    if key.startswith(("ppl", "perplexity")):
        return f"{v:.2f}"
    if not key.startswith("acc"):  # counts (tokens, windows): not a percentage
        return f"{v:,.0f}" if isinstance(v, (int, float)) else str(v)
    err = metrics.get(f"{key}_stderr")
    pct = f"{100 * v:.1f}"
    return f"{pct} ± {100 * err:.1f}" if isinstance(err, float) and not math.isnan(err) else pct


def markdown(report: dict) -> str:
    models = list(report["results"])
    lines = ["# Evaluation", "", f"limit: {report['settings'].get('limit')}; accuracies in %, ± one standard error.", ""]
    lines.append("| task | metric | " + " | ".join(models) + " |")
    lines.append("|---|---|" + "---:|" * len(models))
    for task, key in rows(report["results"]):
        cells = [_fmt(report["results"][m].get(task), key) for m in models]
        n = next((report["results"][m][task].get("n") for m in models if task in report["results"][m]), None)
        label = f"{task} (n={n})" if n else task
        lines.append(f"| {label} | {key} | " + " | ".join(cells) + " |")
    lines += resources_table(report)
    notes = report.get("notes") or []
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def resources_table(report: dict) -> list[str]:
    """Markdown lines: throughput and peak memory per task and model (empty for old reports)."""
    res = report.get("resources") or {}
    models = [m for m in report["results"] if m in res]
    if not models:
        return []
    kind = {"cuda_max_allocated": "CUDA max allocated", "cpu_peak_rss": "CPU peak RSS"}.get(res[models[0]].get("memory"), "peak")
    lines = ["", f"## Speed and memory ({report['settings'].get('device')}, {report['settings'].get('dtype', '?')})", "",
             f"tokens/s through the model (non-padding) · seconds · peak memory ({kind}, MB)", ""]
    lines.append("| task | " + " | ".join(models) + " |")
    lines.append("|---|" + "---:|" * len(models))
    tasks = list(dict.fromkeys(t for m in models for t in res[m].get("tasks", {})))
    for task in tasks:
        cells = []
        for m in models:
            r = res[m].get("tasks", {}).get(task)
            tps = r.get("tokens_per_s") if r else None
            cells.append(f"{tps:,.0f} tok/s · {r['seconds']:.0f} s · {r['peak_mem_mb']:,.0f} MB" if r and tps is not None else "–")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines.append("| (load) | " + " | ".join(f"{res[m]['load_seconds']:.0f} s · {res[m]['params'] / 1e6:,.1f}M params" for m in models) + " |")
    lines.append("| peak | " + " | ".join(f"{res[m]['peak_mem_mb']:,.0f} MB" for m in models) + " |")
    return lines


#: the accuracy a task is read by in the plot (and in the Mamba / GLA / LoLCATs zero-shot tables); others: ``acc``
PRIMARY_ACC = {"arc_challenge": "acc_norm", "hellaswag": "acc_norm"}


def plot_rows(results: dict[str, dict[str, dict]]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(accuracy rows, perplexity rows) of the plot: one accuracy a task (its ``PRIMARY_ACC``) plus its per-length
    or per-count breakdown (``acc@N``: passkey, MQAR), and every ``ppl@L`` / ``perplexity``; the table keeps
    every metric, the plot only what is read."""
    acc, ppl = [], []
    every = rows(results)
    for task, key in every:
        base = task.split("@")[0].split(" ")[0]
        if key == PRIMARY_ACC.get(base, "acc") or key.startswith("acc@"):
            acc.append((task, key))
        elif key.startswith(("ppl@", "perplexity")):
            ppl.append((task, key))

    def order(r: tuple[str, str]) -> tuple[int, float]:  # a task's rows stay together, @N in numeric order
        suffix = r[1].partition("@")[2]
        return (tasks.index(r[0]), float(suffix) if suffix.replace(".", "", 1).isdigit() else -1.0)

    tasks = list(dict.fromkeys(t for t, _ in every))
    return sorted(acc, key=order), sorted(ppl, key=order)


def _label(task: str, key: str) -> str:
    name = task.split("@")[0] if task.startswith(("passkey", "mqar")) else task
    if name.startswith("ppl:"):
        name = name[4:].split("@")[0]
        name = name if len(name) <= 28 else name[:27] + "…"
    return f"{name} {key}"


def _minor_label(ax, x: float, _pos) -> str:
    """Log-axis minor tick labels: every one across less than two decades, else 2 and 5 only (readable either way)."""
    lo, hi = ax.get_xlim()
    lead = f"{x:.0e}"[0]
    return f"{x:g}" if hi / max(lo, 1e-12) < 100 or lead in "25" else ""


def bar_plot(report: dict, path: Path) -> None:
    """Horizontal bars, models side by side: accuracies (with one standard error) in one panel, perplexities
    (log scale) in another. One bar group a metric that is read; the markdown table has the rest."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(report["results"])
    groups = [g for g in zip(("accuracy (%)", "perplexity (log scale)"), plot_rows(report["results"])) if g[1]]
    if not groups:
        groups = [("no metrics", [])]
    heights = [max(len(rs), 1) * (0.18 * len(models) + 0.12) + 0.9 for _, rs in groups]
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    bar = 0.8 / max(len(models), 1)
    for ax, (title, rs) in zip(axes[:, 0], groups):
        pct = title.startswith("accuracy")
        for j, m in enumerate(models):
            res = report["results"][m]
            vals = [res.get(t, {}).get(k, float("nan")) * (100 if pct else 1) for t, k in rs]
            errs = [100 * (res.get(t, {}).get(f"{k}_stderr") or 0.0) if pct else 0.0 for t, k in rs]
            errs = [0.0 if e != e else e for e in errs]  # a NaN stderr (one doc) draws no bar
            ax.barh([i + j * bar for i in range(len(rs))], vals, bar, xerr=errs if pct else None, label=m,
                    error_kw={"elinewidth": 0.8, "capsize": 1.5})
        ax.set_yticks([i + bar * (len(models) - 1) / 2 for i in range(len(rs))])
        ax.set_yticklabels([_label(t, k) for t, k in rs], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(title, fontsize=9)
        if not pct:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(functools.partial(_minor_label, ax)))
            ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="upper center", ncol=len(models), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / sum(heights)))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(report: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "eval.json", "markdown": out / "eval.md", "plot": out / "eval.png"}
    paths["json"].write_text(json.dumps(report, indent=2, sort_keys=False))
    paths["markdown"].write_text(markdown(report))
    bar_plot(report, paths["plot"])
    return paths
