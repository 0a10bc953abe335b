"""Here, after a GPU session: file what the device calls brought back into ``results/`` in one command.

    python -m linearize.pipelines.collect /work/.device/12 /work/.device/13 --logs logs-h200-20261204f

Each argument is one call's ``files_at`` folder, oldest first. From each ``runs.tar.gz``
(``gpu_convert.sh``'s bundle) it copies

* every run folder into ``RESULTS/<run>``, unless the one there is more complete (finished evaluation over
  partial over none; at equal completeness the newer call wins), so a later, cut call never replaces a
  finished row;
* a base model's saved evaluation (``_base/<model>``) where ``RESULTS`` has none;
* the lane logs into ``RESULTS/<--logs>/``;

puts the newest call's ``runs-weights.tar.partNN`` (the unfinished runs' resumable state) into
``.carry/weights/`` in place of the older ones (other ``*-weights.tar.part*`` stems are kept), and
regenerates ``RESULTS/results.{md,json,png}`` over the rows already there plus the new runs that have a
result of their own, each before the first row of its model (the table lists a model's newest runs first).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from .results import PARTIAL

NOT_RUNS = {"_base", "logs"}


def completeness(run: Path) -> int:
    """2: finished evaluation, 1: partial evaluation with a result of the run's own, 0: none (no folder: -1)."""
    if not run.is_dir():
        return -1
    if (run / "eval" / "eval.json").is_file():
        return 2
    partial = run / "eval" / PARTIAL
    if partial.is_file():
        ev = json.loads(partial.read_text())
        return 1 if ev.get("results", {}).get(ev.get("run", run.name)) else 0
    return 0


def _extract(archive: Path, dest: Path) -> None:
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")


def collect_runs(files_at: list[Path], results: Path, logs: str | None, echo=print) -> list[str]:
    """Copy runs, bases and logs from the calls' bundles into ``results``; returns the runs copied, in order."""
    copied: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, call in enumerate(files_at):
            archive = call / "runs.tar.gz"
            if not archive.is_file():
                echo(f"{call}: no runs.tar.gz, skipped")
                continue
            out = Path(tmp) / str(i)
            _extract(archive, out)
            for run in sorted(p for p in out.iterdir() if p.is_dir() and p.name not in NOT_RUNS):
                dest = results / run.name
                new, old = completeness(run), completeness(dest)
                if new < old:
                    echo(f"{run.name}: kept the one in {results} (more complete than {call.name}'s)")
                    continue
                if dest.exists():
                    shutil.rmtree(dest)
                shutil.copytree(run, dest)
                copied = [r for r in copied if r != run.name] + [run.name]
            for base in sorted((out / "_base").glob("*")):
                if not (results / "_base" / base.name).exists():
                    shutil.copytree(base, results / "_base" / base.name)
                    echo(f"_base/{base.name}: added")
            if logs and (out / "logs").is_dir():
                (results / logs).mkdir(parents=True, exist_ok=True)
                for log in (out / "logs").iterdir():
                    shutil.copy(log, results / logs / log.name)
    return copied


def keep_weights(files_at: list[Path], weights: Path, echo=print) -> list[Path]:
    """The newest call's ``runs-weights.tar.part*`` replace those in ``weights``; returns the files kept."""
    newest = next((c for c in reversed(files_at) if list(c.glob("runs-weights.tar.part*"))), None)
    if newest is None:
        return []
    weights.mkdir(parents=True, exist_ok=True)
    for old in weights.glob("runs-weights.tar.part*"):
        old.unlink()
    kept = []
    for part in sorted(newest.glob("runs-weights.tar.part*")):
        shutil.copy(part, weights / part.name)
        kept.append(weights / part.name)
    echo(f"{weights}: {len(kept)} part(s) of runs-weights.tar from {newest}")
    return kept


def _model_of(run: Path) -> str | None:
    report = run / "report.json"
    return json.loads(report.read_text()).get("model") if report.is_file() else None


def table_order(results: Path, new: list[str]) -> list[str]:
    """The rows of ``results/results.json`` in their order, and each new run among them before the first row of its
    model (newest first, as the table lists them), or at the end."""
    table = results / "results.json"
    rows = json.loads(table.read_text())["rows"] if table.is_file() else []
    order = [r["run"] for r in rows]
    models = {r["run"]: r.get("model") for r in rows}
    for name in reversed(new):
        if name in order or completeness(results / name) < 1:  # a row needs a result of the run's own
            continue
        model = _model_of(results / name)
        same = [i for i, r in enumerate(order) if model is not None and models.get(r) == model]
        order.insert(same[0] if same else len(order), name)
        models[name] = model
    return order


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files_at", nargs="+", type=Path, help="the calls' files_at folders, oldest first")
    ap.add_argument("--results", type=Path, default=Path("results/issue6"))
    ap.add_argument("--weights", type=Path, default=Path(".carry/weights"))
    ap.add_argument("--logs", default=None, help="folder under RESULTS for the lane logs, e.g. logs-h200-20261204f")
    ap.add_argument("--no-table", action="store_true", help="leave results.{md,json,png} as they are")
    args = ap.parse_args(argv)
    missing = [str(p) for p in args.files_at if not p.is_dir()]
    if missing:
        print(f"error: no such folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    new = collect_runs(args.files_at, args.results, args.logs)
    keep_weights(args.files_at, args.weights)
    print(f"runs copied: {', '.join(new) or 'none'}")
    if new and not args.no_table:
        from .results import write_table

        md = args.results / "results.md"
        title = md.read_text().splitlines()[0].lstrip("# ").strip() if md.is_file() else None
        write_table([args.results / r for r in table_order(args.results, new)], args.results, title)
        print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
