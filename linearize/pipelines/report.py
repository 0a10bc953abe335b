"""``report.json`` / ``report.md`` and loss plots of a conversion run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_json, atomic_write_text

EVAL_ROWS = [
    ("base", "base model (softmax)"),
    ("swapped", "swapped, untrained"),
    ("stage1", "after attention transfer"),
    ("stage2", "after LoRA (final)"),
]


def plot_losses(metrics_path: Path, plots_dir: Path) -> list[Path]:
    """One PNG per stage: training loss against step (matplotlib, headless)."""
    if not metrics_path.exists():
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_stage: dict[str, list[tuple[int, float]]] = {}
    for line in metrics_path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        by_stage.setdefault(rec["stage"], []).append((rec["step"], rec["loss"]))
    plots_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    titles = {"stage1": "stage 1: attention transfer (sum of layer MSEs)", "stage2": "stage 2: LoRA (next-token loss)"}
    for stage, points in by_stage.items():
        points.sort()
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([p[0] for p in points], [p[1] for p in points], lw=1.2)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        if stage == "stage1":
            ax.set_yscale("log")
        ax.set_title(titles.get(stage, stage))
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = plots_dir / f"loss_{stage}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(out: Path, report: dict[str, Any]) -> str:
    """Write report.json and report.md; return the markdown."""
    atomic_write_json(out / "report.json", report)
    lines = [f"# linearize report: {report['model']}", ""]
    env = report.get("environment", {})
    procs = env.get("processes", 1)
    how = {"sharded": "sharded placement: stage 1 a pipeline of blocks of layers, stage 2 FSDP2 data-parallel",
           "replicate": "replicated placement: stage 1 block-wise over layers, stage 2 DDP data-parallel"}
    lines += [f"- device: {env.get('device')}; torch {env.get('torch')}, transformers {env.get('transformers')}"
              + (f"; {procs} processes ({how[env.get('placement', 'replicate')]})" if procs > 1 else "")]
    if procs > 1 and env.get("placement_reason"):
        lines += [f"- placement chosen by {env['placement_reason']}"]
    if env.get("compiled_layers"):
        lines += ["- training with compiled decoder layers (`compile=true`): each stage's time includes its compiles"]
    lines += [f"- data: `{report['data']['source']}`, seq_len {report['data']['seq_len']}, "
              f"{report['data']['train_rows']} train rows / {report['data']['val_rows']} validation rows"]
    lin = report.get("linearize")
    if lin is None:  # convert=false
        lines += ["- attention: softmax, not converted (the control run: the same stage-2 LoRA on the same data)"]
    else:
        norm = f"length normalization from {lin['length_norm_from']} keys, " if lin.get("length_norm") else ""
        norm += f"{lin['sink_tokens']} sink tokens, " if lin.get("sink_tokens") else ""
        lines += [f"- hybrid attention: window {lin['window']}, feature map {lin['feature_map']} (f={lin['feature_dim']}), "
                  f"{norm}{len(lin['layers'])} layers converted"]
    peaks = report.get("peak_memory_mb_per_rank") or []
    per_rank = f" (per rank before the export: {', '.join(f'{p:.0f}' for p in peaks)} MB)" if len(peaks) > 1 else ""
    lines += [f"- wall time {report['wall_seconds']:.0f} s; peak memory {report['peak_memory_mb']:.0f} MB{per_rank}", ""]

    evals, ood = report["evals"], report.get("evals_ood") or {}
    ood_source = report.get("config", {}).get("data", {}).get("eval_ood_source")
    head = "| model | loss | perplexity | vs base |" + (f" out of domain (`{ood_source}`) | vs base |" if ood else "")
    lines += ["## Validation perplexity", "", head, "|---|---:|---:|---:|" + ("---:|---:|" if ood else "")]
    base_ppl = evals.get("base", {}).get("ppl")
    base_ood = ood.get("base", {}).get("ppl")
    for key, label in EVAL_ROWS:
        if key in evals:
            e = evals[key]
            ratio = f"{e['ppl'] / base_ppl:.2f}x" if base_ppl else ""
            row = f"| {label} | {e['loss']:.4f} | {e['ppl']:.2f} | {ratio} |"
            if ood:
                o = ood.get(key)
                row += f" {o['ppl']:.2f} | {o['ppl'] / base_ood:.2f}x |" if o and base_ood else " – | |"
            lines.append(row)
    lines += ["", "## Training", "", "| stage | steps | tokens | trained params | % of model | final loss | time |", "|---|---:|---:|---:|---:|---:|---:|"]
    total = report["total_params"]
    for name, st in report["stages"].items():
        pct = 100 * st["trainable_params"] / total if total else 0.0
        final = f"{st['final_loss']:.4g}" if st.get("final_loss") is not None else "-"
        label = f"{name} (maps of `{Path(st['from']).parent.name}`, stage1_from)" if st.get("from") else name
        lines.append(f"| {label} | {st['steps']} | {st['tokens']:,} | {st['trainable_params']:,} | {pct:.3f}% | {final} | {st['seconds']:.0f} s |")
    if report.get("plots"):
        lines += [""] + [f"![{Path(p).stem}]({p})" for p in report["plots"]]
    samples = report.get("samples", {})
    if samples.get("base") and samples.get("linearized"):
        lines += ["", "## Samples (greedy)", ""]
        for prompt, a, b in zip(report["sample_prompts"], samples["base"], samples["linearized"]):
            lines += [f"**Prompt:** {prompt}", "", f"- base: {a!r}", f"- linearized: {b!r}", ""]
    md = "\n".join(lines) + "\n"
    atomic_write_text(out / "report.md", md)
    return md
