"""One table over conversion runs: quality against the base model and issue 6's goals, per run.

A run directory holds ``report.json`` (``linearize convert``) and ``eval/eval.json`` (or ``eval.json``;
``linearize eval`` or ``linearize.pipelines.device``) with the base and the converted model side by side.
Either may be missing: the row then shows what there is.

Metrics (lm-evaluation-harness names; accuracies are fractions):

- zero-shot average: the mean of PIQA ``acc``, ARC-Easy ``acc``, ARC-Challenge ``acc_norm``, HellaSwag
  ``acc_norm`` and WinoGrande ``acc`` (the five tasks and metrics of the Mamba / GLA / LoLCATs tables);
- LAMBADA (OpenAI) ``acc``; MMLU 5-shot ``acc``; passkey ``acc@4096``; MQAR ``acc`` (mean over the pairs);
- perplexity at 512 / 2048 / 4096 on in-domain held-out text (the run's ``data.source``) and on the
  out-of-domain text (``data.eval_ood_source``).

Goals (issue 6), each judged against the same run's base column:
zero-shot average >= 100% of base; MMLU and LAMBADA >= 95% of base; in-domain ppl@2048 <= 1.05x base;
passkey@4096 >= 90%; MQAR >= base.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..eval.report import PRIMARY_ACC
from .config import RunConfig

ZERO_SHOT = {t: PRIMARY_ACC.get(t, "acc") for t in ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande")}
LENGTHS = (512, 2048, 4096)
MMLU_CHANCE = 0.25  # 4 answer choices
#: an evaluation cut short by a device call's deadline, in a run's ``eval/`` (``device.eval_side_by_side``
#: writes it): the report so far, with ``partial.deferred`` (the tasks left)
PARTIAL = "partial.json"
GOALS = {
    "zeroshot": "0-shot avg >= 100% base",
    "mmlu_lambada": "MMLU & LAMBADA >= 95% base",
    "ppl2k": "ppl@2K <= 1.05x base",
    "passkey4k": "passkey@4K >= 90%",
    "mqar": "MQAR >= base",
}


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_run(path: Path) -> dict[str, Any]:
    """``{"name", "dir", "report", "eval", "status"}`` of a run directory (missing parts are None). Without a
    finished evaluation (``eval/eval.json``), one cut short by a device call's deadline (``eval/partial.json``)
    stands in; its ``partial`` key lists the tasks left."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such run directory")
    ev = _read(path / "eval" / "eval.json") or _read(path / "eval.json") or _read(path / "eval" / PARTIAL)
    report = _read(path / "report.json")
    if ev is None and report is None:
        raise FileNotFoundError(f"{path}: neither report.json nor eval/eval.json (or eval.json) is there")
    return {"name": path.name, "dir": str(path), "report": report, "eval": ev, "status": _read(path / "status.json")}


def _roles(ev: dict, report: dict | None) -> tuple[str | None, str | None]:
    """(base label, converted label) in an eval report: its ``roles``, else the model alias and the other column."""
    models = list(ev.get("results", {}))
    roles = ev.get("roles") or {}
    base, cand = roles.get("base"), roles.get("linearized")
    if base is None and report is not None and report.get("model") in models:
        base = report["model"]
    if base is None and models:
        base = models[0]
    if cand is None:
        cand = next((m for m in models if m != base), None)
    return base, cand


def _ppl_source(task: str) -> str:
    spec = task[len("ppl:"):]
    return spec.rpartition("@")[0] if "@" in spec else spec


def ppl_tasks(ev: dict, report: dict | None) -> tuple[str | None, str | None]:
    """(in-domain ppl task, out-of-domain ppl task): the eval's ``ppl_roles``, else matched to the run's sources."""
    roles = ev.get("ppl_roles") or {}
    tasks = [t for t in ev.get("tasks", []) if t.startswith("ppl:")]
    ind, ood = roles.get("in_domain"), roles.get("out_of_domain")
    data = ((report or {}).get("config") or {}).get("data") or {}
    if ind is None:
        ind = next((t for t in tasks if _ppl_source(t) == data.get("source")), None)
    if ood is None and data.get("eval_ood_source"):
        ood = next((t for t in tasks if _ppl_source(t) == data["eval_ood_source"]), None)
    if ind is None and ood is None and tasks:
        ind = tasks[0]
    return ind, ood


def metrics(results: dict[str, dict], ind: str | None, ood: str | None) -> dict[str, float | None]:
    """The table's metrics from one model's ``results[task]`` (None where not measured)."""
    out: dict[str, float | None] = {}
    for name, task in (("ppl", ind), ("ood_ppl", ood)):
        for n in LENGTHS:
            out[f"{name}@{n}"] = (results.get(task) or {}).get(f"ppl@{n}") if task else None
    zs = {t: (results.get(t) or {}).get(k) for t, k in ZERO_SHOT.items()}
    out |= {f"zs_{t}": v for t, v in zs.items()}
    out["zeroshot_avg"] = sum(zs.values()) / len(zs) if all(v is not None for v in zs.values()) else None
    out["lambada"] = (results.get("lambada") or {}).get("acc")
    out["mmlu"] = (results.get("mmlu") or {}).get("acc")
    out["mmlu_stderr"] = (results.get("mmlu") or {}).get("acc_stderr")
    passkey = next((r for t, r in results.items() if t.split("@")[0] == "passkey"), None) or {}
    out["passkey@4096"] = passkey.get("acc@4096")
    mqar = next((r for t, r in results.items() if t.split("@")[0] == "mqar"), None) or {}
    out["mqar"] = mqar.get("acc")
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) and not math.isnan(a) and not math.isnan(b) else None


def goals(cand: dict, base: dict) -> dict[str, dict]:
    """Each goal: ``{"met": bool | None, "value": ..., "target": ...}`` (None: not measured)."""
    def goal(value, target, ok) -> dict:
        return {"met": None if value is None else bool(ok(value)), "value": value, "target": target}

    zs = _ratio(cand["zeroshot_avg"], base["zeroshot_avg"])
    mm, lb = _ratio(cand["mmlu"], base["mmlu"]), _ratio(cand["lambada"], base["lambada"])
    known, target = [v for v in (mm, lb) if v is not None], 0.95
    # one of the two measured (a partial evaluation) decides the goal only when it already misses it
    worst = min(known) if len(known) == 2 or (known and min(known) < target) else None
    p2k = _ratio(cand["ppl@2048"], base["ppl@2048"])
    mq = None if cand["mqar"] is None or base["mqar"] is None else cand["mqar"] - base["mqar"]
    return {
        "zeroshot": goal(zs, 1.0, lambda v: v >= 1.0),
        "mmlu_lambada": goal(worst, target, lambda v: v >= target),
        "ppl2k": goal(p2k, 1.05, lambda v: v <= 1.05),
        "passkey4k": goal(cand["passkey@4096"], 0.90, lambda v: v >= 0.90),
        "mqar": goal(mq, 0.0, lambda v: v >= 0.0),
    }


#: the default stage-2 learning rate; a run at another one says so in its recipe
STAGE2_LR = RunConfig().stage2.lr


def recipe(report: dict | None) -> str:
    if report is None:
        return "?"
    cfg = report.get("config") or {}
    s1, s2 = (report.get("stages") or {}).get("stage1", {}), (report.get("stages") or {}).get("stage2", {})
    steps = f"{s1.get('steps', 0)}+{s2.get('steps', 0)} steps"
    loss = cfg.get("stage2_loss") or {}
    w = lambda x: "" if x == 1 else f"{x:g}"  # noqa: E731  (a weight other than 1 is named)
    kl = ("" if not loss.get("kl_weight") or not s2.get("steps") else f" {w(loss['kl_weight'])}kl" if not loss.get("ce_weight")
          else f" {w(loss['ce_weight'])}ce+{w(loss['kl_weight'])}kl")
    lr2 = (cfg.get("stage2") or {}).get("lr")
    kl += f" lr{lr2:g}" if s2.get("steps") and lr2 is not None and lr2 != STAGE2_LR else ""
    if cfg.get("convert") is False or (report.get("linearize") is None and "convert" in report):
        return f"softmax control: LoRA only{kl} ({steps})"
    lin = report.get("linearize") or cfg.get("linearize") or {}
    norm = f" lennorm{lin.get('length_norm_from')}" if lin.get("length_norm") else ""
    norm += f" sink{lin['sink_tokens']}" if lin.get("sink_tokens") else ""
    norm += " nope" if lin.get("feature_rope") is False else ""  # feature maps before RoPE
    norm += " kvmaps" if lin.get("feature_map_per_kv_head") else ""  # key maps per KV head
    norm += f" softmax{len(lin['softmax_layers'])}" if lin.get("softmax_layers") else ""  # layers kept softmax
    norm += f" heads{len(lin['softmax_heads'])}" if lin.get("softmax_heads") else ""  # KV heads kept softmax
    layers = (cfg.get("lora") or {}).get("layers", "all")
    norm += "" if layers == "all" else " lora:lin" if layers == "linearized" else f" lora:{len(layers)}"
    norm += kl  # stage 2 distilled from the base
    return f"w{lin.get('window')} {lin.get('feature_map')}/f{lin.get('feature_dim')}{norm} ({steps} @ {cfg.get('data', {}).get('seq_len')})"


def run_row(run: dict) -> dict[str, Any]:
    """One table row: base and converted metrics, their ratios, goals, training cost."""
    report, ev = run["report"], run["eval"]
    row: dict[str, Any] = {"run": run["name"], "model": (report or {}).get("model"), "recipe": recipe(report)}
    if report is not None:
        stages = report.get("stages") or {}
        row["train_tokens"] = sum(s.get("tokens", 0) for s in stages.values())
        row["train_seconds"] = sum(s.get("seconds", 0.0) for s in stages.values())
        row["wall_seconds"] = report.get("wall_seconds")
        evals, ood = report.get("evals") or {}, report.get("evals_ood") or {}
        final = "stage2" if "stage2" in evals else "stage1" if "stage1" in evals else None
        row["val_ppl"] = {"base": evals.get("base", {}).get("ppl"), "final": evals.get(final, {}).get("ppl") if final else None}
        row["val_ppl_ood"] = {"base": ood.get("base", {}).get("ppl"), "final": ood.get(final, {}).get("ppl") if final else None}
        row["device"] = (report.get("environment") or {}).get("device")
    if ev is not None:
        base_label, cand_label = _roles(ev, report)
        ind, ood_task = ppl_tasks(ev, report)
        res = ev.get("results", {})
        base = metrics(res.get(base_label, {}), ind, ood_task)
        cand = metrics(res.get(cand_label, {}), ind, ood_task) if cand_label else None
        if row["model"] is None:  # a base-only evaluation (device queue --base-only): its model is the base
            row["model"] = base_label
        row["base_only"] = report is None and cand is None
        row |= {"base_label": base_label, "ppl_in_domain": ind, "ppl_out_of_domain": ood_task, "base": base, "converted": cand,
                "eval_settings": ev.get("settings")}
        if cand is not None:
            row["ratios"] = {k: _ratio(cand[k], base[k]) for k in cand}
            row["goals"] = goals(cand, base)
            row["goals_met"] = sum(1 for g in row["goals"].values() if g["met"])
            row["goals_measured"] = sum(1 for g in row["goals"].values() if g["met"] is not None)
        if ev.get("partial"):
            row["partial"] = list(ev["partial"].get("deferred", []))
    if run.get("status"):
        row["status"] = run["status"].get("phase")
    return row


def _run_cell(row: dict) -> str:
    """The run's name; a partial evaluation says which tasks it lacks."""
    left = [t.split(": ", 1)[-1] for t in row.get("partial") or []]
    return f"{row['run']} (partial: no {', '.join(dict.fromkeys(left))})" if left else row["run"]


# ---------------------------------------------------------------------------------------------------
# formatting


def _ppl_cell(row: dict, key: str) -> str:
    c = (row.get("converted") or {}).get(key)
    r = (row.get("ratios") or {}).get(key)
    return "–" if c is None else f"{c:.2f} ({r:.2f}x)" if r is not None else f"{c:.2f}"


def _acc_cell(row: dict, key: str) -> str:
    c = (row.get("converted") or {}).get(key)
    r = (row.get("ratios") or {}).get(key)
    return "–" if c is None else f"{100 * c:.1f} ({100 * r:.0f}%)" if r is not None else f"{100 * c:.1f}"


def _goal_cell(g: dict | None, kind: str) -> str:
    if not g or g["met"] is None:
        return "–"
    mark = "✓" if g["met"] else "✗"
    v = g["value"]
    text = {"ratio": f"{100 * v:.1f}%", "x": f"{v:.3f}x", "abs": f"{100 * v:.0f}%", "diff": f"{100 * v:+.1f} pts"}[kind]
    return f"{mark} {text}"


GOAL_KINDS = {"zeroshot": "ratio", "mmlu_lambada": "ratio", "ppl2k": "x", "passkey4k": "abs", "mqar": "diff"}


def markdown(rows: list[dict], title: str = "Conversion runs against their base models") -> str:
    lines = [f"# {title}", "",
             "Converted model's value, then its ratio to the base model evaluated in the same run "
             "(perplexities: lower is better; accuracies in %).", ""]
    head = ["run", "model", "recipe", "train tokens", "train min", "ppl@512", "ppl@2K", "ppl@4K", "OOD ppl@2K",
            "0-shot avg", "LAMBADA", "MMLU", "passkey@4K", "MQAR"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    runs = [r for r in rows if not r.get("base_only")]  # a base-only evaluation has no run row, only its base's
    for r in runs:
        tok = f"{r['train_tokens'] / 1e6:.1f}M" if r.get("train_tokens") is not None else "–"
        mins = f"{r['train_seconds'] / 60:.1f}" if r.get("train_seconds") is not None else "–"
        c = r.get("converted") or {}
        pk = "–" if c.get("passkey@4096") is None else f"{100 * c['passkey@4096']:.0f}%"
        cells = [_run_cell(r), r.get("model") or "?", r["recipe"], tok, mins, _ppl_cell(r, "ppl@512"), _ppl_cell(r, "ppl@2048"),
                 _ppl_cell(r, "ppl@4096"), _ppl_cell(r, "ood_ppl@2048"), _acc_cell(r, "zeroshot_avg"), _acc_cell(r, "lambada"),
                 _acc_cell(r, "mmlu"), pk, _acc_cell(r, "mqar")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Issue 6 goals", "", "| run | " + " | ".join(GOALS.values()) + " | met |", "|---|" + "---|" * len(GOALS) + "---:|"]
    for r in runs:
        g = r.get("goals") or {}
        met = f"{r['goals_met']}/{r['goals_measured']}" if "goals_met" in r else "–"
        lines.append(f"| {_run_cell(r)} | " + " | ".join(_goal_cell(g.get(k), GOAL_KINDS[k]) for k in GOALS) + f" | {met} |")
    bases = {}
    for r in rows:
        if r.get("base") and r.get("model") not in bases:
            bases[r.get("model")] = r
    if bases:
        lines += ["", "## Base models (as evaluated in these runs)", "",
                  "| model | ppl@512 | ppl@2K | ppl@4K | OOD ppl@2K | 0-shot avg | LAMBADA | MMLU | passkey@4K | MQAR |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for model, r in bases.items():
            b = r["base"]
            f = lambda k, pct=False: "–" if b.get(k) is None else f"{100 * b[k]:.1f}" if pct else f"{b[k]:.2f}"  # noqa: E731
            lines.append(f"| {model} | {f('ppl@512')} | {f('ppl@2048')} | {f('ppl@4096')} | {f('ood_ppl@2048')} | {f('zeroshot_avg', True)} | "
                         f"{f('lambada', True)} | {f('mmlu', True)} | {f('passkey@4096', True)} | {f('mqar', True)} |")
    notes = sorted({f"{r['run']}: in-domain `{r.get('ppl_in_domain')}`, out-of-domain `{r.get('ppl_out_of_domain')}`" for r in rows if r.get("base")})
    lines += ["", "Zero-shot average: PIQA acc, ARC-E acc, ARC-C acc_norm, HellaSwag acc_norm, WinoGrande acc. "
              "MQAR: mean accuracy over its pair counts; its goal is the difference to base in points. Perplexity texts:", ""]
    lines += [f"- {n}" for n in notes]
    for model, r in bases.items():
        b = r["base"]
        if b.get("mmlu") is not None and b.get("mmlu_stderr") and abs(b["mmlu"] - MMLU_CHANCE) < 2 * b["mmlu_stderr"]:
            lines += ["", f"MMLU: the base {model} scores {100 * b['mmlu']:.1f} ± {100 * b['mmlu_stderr']:.1f}, within two "
                      f"standard errors of chance ({100 * MMLU_CHANCE:.0f}%, 4 choices); its ratio goal compares chance-level scores."]
    return "\n".join(lines) + "\n"


def _by_model(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """Rows grouped by model, in the order each model first appears (a plot's panels follow the table)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r.get("model") or "?", []).append(r)
    return list(groups.items())


def bar_plot(rows: list[dict], path: Path) -> None:
    """Three panels: accuracy ratios to base, perplexity ratios to base, passkey@4K (with the goal lines). Runs are
    the rows of horizontal bars, in the table's order, so a table of 40 runs still reads (the figure grows down)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("ratios")]
    names = [r["run"] for r in rows]
    panels = [
        ("accuracy, % of base", [("zeroshot_avg", "0-shot avg"), ("lambada", "LAMBADA"), ("mmlu", "MMLU"), ("mqar", "MQAR")], 100, [100, 95]),
        ("perplexity, x base (log)", [("ppl@512", "@512"), ("ppl@2048", "@2K"), ("ppl@4096", "@4K"), ("ood_ppl@2048", "OOD @2K")], 1, [1.05]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 1.2 + 0.32 * len(rows)), sharey=True,
                             gridspec_kw={"width_ratios": [3, 3, 1.4]}, squeeze=False)
    axes = axes[0]
    ys = list(range(len(rows)))
    for ax, (title, keys, scale, lines) in zip(axes[:2], panels):
        height = 0.8 / len(keys)
        for j, (k, label) in enumerate(keys):
            vals = [(r["ratios"].get(k) or float("nan")) * scale for r in rows]
            ax.barh([y - 0.4 + (j + 0.5) * height for y in ys], vals, height, label=label)
        for x in lines:
            ax.axvline(x, color="k", lw=0.8, ls="--")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        if scale == 1:
            ax.set_xscale("log")
    pk = [100 * ((r.get("converted") or {}).get("passkey@4096") or float("nan")) for r in rows]
    axes[2].barh(ys, pk, 0.6, color="tab:purple")
    axes[2].axvline(90, color="k", lw=0.8, ls="--")
    axes[2].set_xlim(0, 105)
    axes[2].set_title("passkey@4K, %", fontsize=9)
    axes[0].set_yticks(ys, names, fontsize=7)
    axes[0].set_ylim(len(rows) - 0.5, -0.5)  # the table's first run on top, no empty margin
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", lw=0.3, alpha=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plain_log_labels(ax) -> None:
    """A log y axis labelled 0.8 / 1 / 10 rather than 8 x 10^-1; within one decade its minor ticks get labels too
    (otherwise a panel of ratios near 1 shows a single label)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    lo, hi = ax.get_ylim()
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain if hi / lo < 10 else NullFormatter())
    ax.tick_params(axis="y", which="both", labelsize=7)


def length_plot(rows: list[dict], path: Path) -> None:
    """Perplexity against context length (512 / 2K / 4K), as a ratio to the base model, one line per run and one
    row of panels per model: where length generalization breaks shows as a line leaving the 1.0 floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("in-domain text (held out)", [f"ppl@{n}" for n in LENGTHS]),
              ("out-of-domain text (pydocs)", [f"ood_ppl@{n}" for n in LENGTHS]))
    groups = [(m, [r for r in rs if all((r.get("ratios") or {}).get(k) is not None for _, keys in panels for k in keys)])
              for m, rs in _by_model(rows)]
    groups = [(m, rs) for m, rs in groups if rs]  # (runs without perplexities at every length draw no line)
    if not groups:
        path.unlink(missing_ok=True)  # nothing to draw: no stale plot from an earlier table either
        return
    heights = [max(2.6, 0.15 * len(rs) + 0.9) for _, rs in groups]
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for (model, rs), row in zip(groups, axes):
        for ax, (title, keys) in zip(row, panels):
            for i, r in enumerate(rs):  # tab20 and two line styles: no two runs of a model look alike
                ax.plot(LENGTHS, [r["ratios"][k] for k in keys], marker="o", label=r["run"],
                        color=plt.cm.tab20(i % 20), ls="-" if (i // 20) % 2 == 0 else "--")
            ax.axhline(1.05, color="k", ls="--", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(LENGTHS, [str(n) for n in LENGTHS])
            ax.set_title(f"{model}: {title}", fontsize=9)
            _plain_log_labels(ax)
        row[0].set_ylabel("perplexity, x base (log)")
        row[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), ncol=1 if len(rs) <= 16 else 2,
                      borderaxespad=0)
    axes[-1][0].set_xlabel("context length (tokens)")
    axes[-1][1].set_xlabel("context length (tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_table(run_dirs: list[Path], out: Path, title: str | None = None) -> list[dict]:
    """``out/results.md``, ``results.json`` and ``results.png`` over ``run_dirs`` (in the order given)."""
    rows = [run_row(load_run(Path(d))) for d in run_dirs]
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"rows": rows, "goals": GOALS, "zero_shot": ZERO_SHOT}, indent=2) + "\n")
    (out / "results.md").write_text(markdown(rows, title or "Conversion runs against their base models"))
    if any(r.get("ratios") for r in rows):
        bar_plot(rows, out / "results.png")
        length_plot(rows, out / "results-length.png")
    return rows
