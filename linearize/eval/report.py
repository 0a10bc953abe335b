"""``eval.json``, ``eval.md`` (one row per task metric, one column per model) and ``eval.png``."""

from __future__ import annotations

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


def bar_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(report["results"])
    all_rows = rows(report["results"])
    groups = [("accuracy", [r for r in all_rows if r[1].startswith("acc")]), ("perplexity", [r for r in all_rows if r[1].startswith(("ppl", "perplexity"))])]
    groups = [g for g in groups if g[1]]
    fig, axes = plt.subplots(len(groups) or 1, 1, figsize=(max(6, 0.9 * max((len(g[1]) for g in groups), default=1) * len(models) + 2), 4 * max(len(groups), 1)), squeeze=False)
    width = 0.8 / max(len(models), 1)
    for ax, (title, rs) in zip(axes[:, 0], groups):
        for j, m in enumerate(models):
            vals = [report["results"][m].get(t, {}).get(k, float("nan")) for t, k in rs]
            ax.bar([i + j * width for i in range(len(rs))], vals, width, label=m)
        ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(rs))])
        ax.set_xticklabels([f"{t}\n{k}" for t, k in rs], fontsize=7, rotation=30, ha="right")
        ax.set_ylabel(title)
        if title == "perplexity":
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "eval.json", "markdown": out / "eval.md", "plot": out / "eval.png"}
    paths["json"].write_text(json.dumps(report, indent=2, sort_keys=False))
    paths["markdown"].write_text(markdown(report))
    bar_plot(report, paths["plot"])
    return paths
