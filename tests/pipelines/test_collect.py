"""collect: the device calls' bundles filed into results/, never a finished row replaced by a cut one."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from linearize.pipelines import collect


def _bundle(call: Path, files: dict[str, str], weights: list[str] = ()) -> Path:
    call.mkdir(parents=True)
    with tarfile.open(call / "runs.tar.gz", "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    for w in weights:
        (call / w).write_text(f"{call.name}:{w}")
    return call


def _report(model: str) -> str:
    return json.dumps({"model": model})


def _partial(run: str, own: bool) -> str:
    return json.dumps({"run": run, "results": {run: {"piqa": {"acc": 0.5}} if own else {}, "base": {"piqa": {"acc": 0.6}}}})


def test_collect_keeps_the_more_complete_run_and_the_newest_weights(tmp_path):
    a = _bundle(tmp_path / "12", {
        "r1/report.json": _report("m"), "r1/eval/eval.json": "{}", "r1/metrics.jsonl": "a\n",
        "r2/report.json": _report("m"),
        "logs/lane0.log": "call 12",
    }, ["runs-weights.tar.part00", "runs-weights.tar.part01", "runs-weights.tar.part02"])
    b = _bundle(tmp_path / "13", {
        "r1/report.json": _report("m"), "r1/eval/partial.json": _partial("r1", True), "r1/metrics.jsonl": "b\n",
        "r2/report.json": _report("m"), "r2/eval/partial.json": _partial("r2", True),
        "r3/report.json": _report("m"), "r3/eval/partial.json": _partial("r3", False),
        "_base/m/piqa.json": "{}",
        "logs/lane1.log": "call 13",
    }, ["runs-weights.tar.part00"])
    results, weights = tmp_path / "results", tmp_path / "weights"
    (results / "_base").mkdir(parents=True)
    weights.mkdir()
    (weights / "maps-weights.tar.part00").write_text("kept")
    (weights / "runs-weights.tar.part05").write_text("stale")
    notes = []

    copied = collect.collect_runs([a, b], results, "logs-x", echo=notes.append)
    kept = collect.keep_weights([a, b], weights, echo=notes.append)

    assert (results / "r1" / "metrics.jsonl").read_text() == "a\n"  # call 12's finished run, not call 13's cut one
    assert any("r1: kept" in n for n in notes)
    assert collect.completeness(results / "r2") == 1 and collect.completeness(results / "r3") == 0
    assert copied == ["r1", "r2", "r3"]  # r1 from call 12, r2 and r3 last from call 13
    assert (results / "_base" / "m" / "piqa.json").is_file()
    assert sorted(p.name for p in (results / "logs-x").iterdir()) == ["lane0.log", "lane1.log"]
    assert sorted(p.name for p in weights.iterdir()) == ["maps-weights.tar.part00", "runs-weights.tar.part00"]
    assert (weights / "runs-weights.tar.part00").read_text() == "13:runs-weights.tar.part00" and kept


def test_new_rows_go_before_their_models_first_row(tmp_path):
    rows = [{"run": "s1", "model": "smol"}, {"run": "q1", "model": "qwen"}, {"run": "q-base", "model": "qwen"},
            {"run": "a1", "model": "smol"}]
    (tmp_path / "results.json").write_text(json.dumps({"rows": rows}))
    for name, model, ev in (("q2", "qwen", True), ("q3", "qwen", True), ("g1", "gemma", True), ("q4", "qwen", False)):
        (tmp_path / name / "eval").mkdir(parents=True)
        (tmp_path / name / "report.json").write_text(_report(model))
        if ev:
            (tmp_path / name / "eval" / "eval.json").write_text("{}")
    order = collect.table_order(tmp_path, ["q2", "q3", "g1", "q4", "q1"])
    # q4 has no result of its own: no row; q1 is already a row and stays where it is
    assert order == ["s1", "q2", "q3", "q1", "q-base", "a1", "g1"]


def test_missing_folder_is_one_line(tmp_path, capsys):
    assert collect.main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no such folder") and "\n" not in err
