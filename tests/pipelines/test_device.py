"""The device runner on a tiny model (CPU): queue, resumed evaluation, shared base results, waiting, bundle."""

import argparse
import json
import tarfile
from pathlib import Path

import pytest

from linearize.pipelines import device
from linearize.pipelines.config import build_config

from .tiny_run import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("own_cache")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _line(model, name, text, other, *extra):
    sets = " ".join(f"--set '{s}'" for s in tiny_overrides(text, 2, 2) + [f"data.eval_ood_source={other}", *extra])
    tasks = f"ppl:{text}@16,32,ppl:{other}@16,passkey@64,mqar@2"
    return f"{model} {name} --preset none {sets} --tasks '{tasks}' --limit 2 --batch-size 4 --done-dir none"


def test_queue_runs_evaluates_side_by_side_and_bundles(setup_ood, tmp_path):
    model, text, other = setup_ood
    queue = tmp_path / "q.txt"
    queue.write_text("# a converted run and its control\n" + _line(model, "lin", text, other) + "\n"
                     + _line(model, "ctl", text, other, "convert=false", "stage1.steps=0") + "\n")
    runs = tmp_path / "runs"
    assert device.run_queue(queue, runs, echo=lambda m: None) == {"lin": "done", "ctl": "done"}
    ev = json.loads((runs / "lin" / "eval" / "eval.json").read_text())
    assert ev["roles"] == {"base": str(model), "linearized": "lin"} and ev["models"] == [str(model), "lin"]
    assert ev["ppl_roles"] == {"in_domain": f"ppl:{text}@16,32", "out_of_domain": f"ppl:{other}@16"}
    assert ev["results"]["lin"][f"ppl:{text}@16,32"]["ppl@32"] > 1 and "acc" in ev["results"]["lin"]["mqar@2"]
    assert (runs / "lin" / "eval" / "eval.md").exists() and (runs / "lin" / "eval" / "eval.png").exists()
    # the base model was evaluated once (under _base) and reused by the control run
    base_parts = sorted(p.name for p in (runs / "_base").glob("*/*.json"))
    assert len([p for p in base_parts if p != "_load.json"]) == 4
    ctl = json.loads((runs / "ctl" / "eval" / "eval.json").read_text())
    assert ctl["results"][str(model)] == ev["results"][str(model)]
    assert json.loads((runs / "ctl" / "report.json").read_text())["linearize"] is None
    # a second pass finds everything done and recomputes nothing
    stamps = {p: p.stat().st_mtime_ns for p in runs.rglob("eval_parts/*.json")}
    assert device.run_queue(queue, runs, echo=lambda m: None) == {"lin": "done", "ctl": "done"}
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("eval_parts/*.json")} == stamps

    out = tmp_path / "out"
    log = tmp_path / "call.log"
    log.write_text("log line\n")
    paths = device.bundle([runs / "lin", runs / "ctl", runs / "never-started"], out, log=log)
    assert [p.name for p in paths] == ["runs.tar.gz", "runs-summary.md"] and len(list(out.iterdir())) == 2
    names = tarfile.open(paths[0]).getnames()
    for want in ("lin/report.json", "lin/eval/eval.json", "lin/plots/loss_stage1.png", "ctl/metrics.jsonl", "logs/call.log"):
        assert want in names, want
    # the converted model's per-task results come back too (a record of an eval cut short)
    assert {n for n in names if n.startswith("lin/eval_parts/")} == {f"lin/eval_parts/{p.name}" for p in (runs / "lin" / "eval_parts").glob("*.json")}
    assert any(n.startswith("lin/eval_parts/") for n in names)
    assert any(n.startswith("_base/") for n in names) and not any("/model/" in n or "checkpoints" in n for n in names)
    md = paths[1].read_text()
    assert "| lin | done | 2/2 | 2/2 |" in md and "| ctl | done | –/– | 2/2 |" in md and "Results so far" in md

    # the bundle, unpacked where the next session's checkout has it, makes the queue skip finished runs
    done = tmp_path / "done"
    tarfile.open(paths[0]).extractall(done, filter="data")
    queue.write_text(_line(model, "lin", text, other).replace("--done-dir none", f"--done-dir {done}") + "\n")
    assert device.run_queue(queue, tmp_path / "fresh", echo=lambda m: None) == {"lin": "done elsewhere"}


class Killed(BaseException):
    """Not an Exception: the queue's per-run error handling must not swallow it, as it cannot swallow a SIGKILL."""


def test_a_killed_evaluation_resumes_at_the_next_task(setup_ood, tmp_path, monkeypatch):
    model, text, other = setup_ood
    queue = tmp_path / "q.txt"
    queue.write_text(_line(model, "lin", text, other) + "\n")
    runs = tmp_path / "runs"
    calls, killed = [], []
    from linearize.eval import run as eval_run

    original = eval_run.run_task

    def flaky(model_, tok, task, **kw):
        calls.append(task)
        if len(calls) == 3 and not killed:
            killed.append(task)
            raise Killed  # the deadline's SIGKILL: nothing after this point runs
        return original(model_, tok, task, **kw)

    monkeypatch.setattr(eval_run, "run_task", flaky)
    with pytest.raises(Killed):
        device.run_queue(queue, runs, echo=lambda m: None)
    assert json.loads((runs / "lin" / "status.json").read_text())["phase"] == "eval"
    assert device.progress(runs / "lin")["phase"] == "eval"
    calls.clear()
    assert device.run_queue(queue, runs, echo=lambda m: None) == {"lin": "done"}
    assert len(calls) == 4 - 2 + 4  # the converted model first: 2 were saved before the kill; the 2 left, then the base's 4


def test_a_base_only_lane_fills_the_shared_base_results(setup_ood, tmp_path, monkeypatch):
    """`--base-only` evaluates the base alone (another lane converts meanwhile); the run then evaluates only
    its converted model, and its report has both, base first."""
    model, text, other = setup_ood
    runs = tmp_path / "runs"
    base_q, run_q = tmp_path / "base.txt", tmp_path / "run.txt"
    base_q.write_text(_line(model, "tiny-base", text, other) + " --base-only\n")
    run_q.write_text(_line(model, "lin", text, other) + "\n")
    from linearize.eval import run as eval_run

    calls, original = [], eval_run.run_task
    monkeypatch.setattr(eval_run, "run_task", lambda m, tok, task, **kw: calls.append(task) or original(m, tok, task, **kw))
    assert device.run_queue(base_q, runs, echo=lambda m: None) == {"tiny-base": "done"}
    assert len(calls) == 4 and not (runs / "tiny-base" / "report.json").exists()
    ev = json.loads((runs / "tiny-base" / "eval" / "eval.json").read_text())
    assert ev["models"] == [str(model)] and ev["roles"] == {"base": str(model)}
    calls.clear()
    assert device.run_queue(run_q, runs, echo=lambda m: None) == {"lin": "done"}
    assert len(calls) == 4  # the converted model's only
    ev2 = json.loads((runs / "lin" / "eval" / "eval.json").read_text())
    assert ev2["models"] == [str(model), "lin"] and ev2["results"][str(model)] == ev["results"][str(model)]


def test_failed_run_is_recorded_and_the_queue_goes_on(setup_ood, tmp_path):
    model, text, other = setup_ood
    queue = tmp_path / "q.txt"
    queue.write_text(_line(model, "bad", text, other, "data.seq_len=4096") + "\n" + _line(model, "good", text, other) + "\n")
    phases = device.run_queue(queue, tmp_path / "runs", echo=lambda m: None)
    assert phases == {"bad": "failed", "good": "done"}
    st = json.loads((tmp_path / "runs" / "bad" / "status.json").read_text())
    assert st["phase"] == "failed" and "longer than the model takes" in st["error"]


def test_a_run_waits_for_its_carried_inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the queue line names configs/ relative to the checkout, as on the device
    queue = tmp_path / "q.txt"
    queue.write_text("smollm2-135m main --config configs/smollm2-135m.yaml --suite quick --done-dir none\n")
    assert device.run_queue(queue, tmp_path / "runs", echo=lambda m: None) == {"main": "waiting"}
    st = json.loads((tmp_path / "runs" / "main" / "status.json").read_text())
    assert st["phase"] == "waiting"
    assert any("smollm2-135m" in m for m in st["missing"]) and "corpus sharegpt" in st["missing"]
    assert any(m.startswith("eval data") for m in st["missing"])


def test_suites_hold_out_the_in_domain_text_only_when_the_eval_split_is_the_training_split(tmp_path):
    cfg = build_config("full", ROOT / "configs/smollm2-135m.yaml", [], model="smollm2-135m")
    tasks, roles = device.suite_tasks("full", cfg, echo=lambda m: None)
    assert roles == {"in_domain": "ppl:austen+shakespeare+sharegpt@512,2048,4096", "out_of_domain": "ppl:pydocs@512,2048,4096"}
    names = [t for t, _ in tasks]
    for want in ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "lambada", "mmlu", "passkey@1024,2048,4096", "mqar"):
        assert want in names
    notes = []
    other_split = build_config("full", ROOT / "configs/smollm2-135m.yaml", ["seed=1"], model="smollm2-135m")
    assert "in_domain" not in device.suite_tasks("quick", other_split, echo=notes.append)[1] and notes
    text = tmp_path / "t.txt"
    text.write_text("x")
    file_source = build_config("full", None, [f"data.source={text}"])
    assert device.suite_tasks("quick", file_source, echo=notes.append)[1] == {}
    with pytest.raises(ValueError, match="unknown suite"):
        device.suite_tasks("huge", cfg)


def test_every_config_file_builds(monkeypatch):
    monkeypatch.chdir(ROOT)
    files = sorted(Path("configs").rglob("*.yaml"))
    assert len(files) >= 12
    for f in files:
        cfg = build_config("full", f, [], model="smollm2-135m")
        tokens = (cfg.stage1.steps * cfg.stage1.batch_size if cfg.convert else 0) * cfg.data.seq_len + cfg.stage2.steps * cfg.stage2.batch_size * cfg.data.seq_len
        assert tokens <= 20_000_000, f  # issue 6: at most 20M training tokens per run
        assert cfg.data.eval_ood_source == "pydocs" and "pydocs" not in cfg.data.source, f
    for q in sorted(Path("configs/queues").glob("*.txt")):
        for line in device.parse_queue(q):
            args = device.parser_run(argparse.ArgumentParser()).parse_args(line)
            build_config(None if args.preset == "none" else args.preset, args.config, args.sets, model=args.model)


def test_bundle_of_lanes_takes_every_queue_and_log(tmp_path):
    """`gpu_convert.sh --lanes Q1 Q2` bundles the runs of every lane's queue and every lane's log."""
    runs, out = tmp_path / "runs", tmp_path / "out"
    queues, logs = [], []
    for i, names in enumerate((["a", "b"], ["c", "a"])):  # a run named in two queues is bundled once
        q = tmp_path / f"q{i}.txt"
        q.write_text("".join(f"smollm2-135m {n} --suite quick\n" for n in names))
        queues.append(q)
        lg = tmp_path / f"lane{i}.log"
        lg.write_text(f"lane {i}\n")
        logs.append(lg)
    for n in "abc":
        device._status(runs / n, run=n, phase="waiting", missing=["model"])
    argv = ["--runs", str(runs), "bundle", "--to", str(out)]
    for q, lg in zip(queues, logs):
        argv += ["--queue", str(q), "--log", str(lg)]
    assert device.main(argv) == 0
    with tarfile.open(out / "runs.tar.gz") as tar:
        names = tar.getnames()
    assert {"logs/lane0.log", "logs/lane1.log"} <= set(names)
    md = (out / "runs-summary.md").read_text()
    assert [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ") and "waiting" in line] == ["a", "b", "c"]


def test_weights_bundle_restores_a_run_on_a_fresh_machine(setup_ood, tmp_path, monkeypatch):
    """A trained run comes back as weight parts and, restored into an empty runs folder, exports the same
    model without training again (resuming mid-stage is test_resume's; the same checkpoint files travel)."""
    from safetensors.torch import load_file

    from linearize.pipelines import run as run_mod

    model, text, other = setup_ood
    queue = tmp_path / "q.txt"
    sets = " ".join(f"--set '{s}'" for s in tiny_overrides(text, 2, 2) + [f"data.eval_ood_source={other}"])
    queue.write_text(f"{model} lin --preset none {sets} --suite none --done-dir none\n")
    runs = tmp_path / "runs"
    assert device.run_queue(queue, runs, echo=lambda m: None) == {"lin": "done"}
    monkeypatch.setattr(device, "WEIGHT_PART_BYTES", 40_000)  # several parts, joined in order on restore
    out = tmp_path / "out"
    assert device.main(["--runs", str(runs), "bundle", "lin", "--to", str(out), "--weights"]) == 0
    parts = sorted(out.glob("runs-weights.tar.part*"))
    assert len(parts) > 1 and all(p.stat().st_size <= 40_000 for p in parts)

    fresh = tmp_path / "fresh"
    assert device.restore(out, fresh, echo=lambda m: None) == ["lin"]
    assert not (fresh / "lin" / "model").exists() and (fresh / "lin" / "checkpoints" / "LATEST").is_file()

    def no_training(*a, **k):
        raise AssertionError("a restored finished run must not train again")

    monkeypatch.setattr(run_mod, "train_stage", no_training)
    assert device.run_queue(queue, fresh, echo=lambda m: None) == {"lin": "done"}
    a = load_file(runs / "lin" / "model" / "model.safetensors")
    b = load_file(fresh / "lin" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    # restoring again keeps what is there (same checkpoint), and a finished-and-evaluated run is not bundled
    assert device.restore(out, fresh, echo=lambda m: None) == []
    (runs / "lin" / "eval").mkdir()
    (runs / "lin" / "eval" / "eval.json").write_text("{}")
    assert device.bundle_weights([runs / "lin"], out, echo=lambda m: None) == [] and not list(out.glob("runs-weights*"))


def test_restore_says_when_a_part_is_missing(tmp_path):
    (tmp_path / "runs-weights.tar.part00").write_bytes(b"not a tar" * 100)
    with pytest.raises(ValueError, match="carry every part"):
        device.restore(tmp_path, tmp_path / "runs", echo=lambda m: None)


def test_a_queued_run_takes_an_earlier_runs_maps_by_name(setup_ood, tmp_path):
    """``stage1_from=<run name>`` in a queue: the name resolves beside the run, in the queue's runs directory."""
    model, text, other = setup_ood
    queue = tmp_path / "q.txt"
    queue.write_text(_line(model, "maps", text, other, "stage2.steps=0") + "\n"
                     + _line(model, "reuse", text, other, "stage1.steps=0", "stage1_from=maps") + "\n")
    runs = tmp_path / "runs"
    assert device.run_queue(queue, runs, echo=lambda m: None) == {"maps": "done", "reuse": "done"}
    st = json.loads((runs / "reuse" / "report.json").read_text())["stages"]["stage1"]
    assert st["from"] == str(runs / "maps" / "stage1_final.safetensors") and st["steps"] == 2


def test_a_run_waits_for_maps_another_lane_has_not_made_yet(setup_ood, tmp_path):
    """``stage1_from`` naming a run that has not finished its stage 1 (another lane's, or carried weights not
    restored yet): the run waits, and the next call takes the maps."""
    model, text, other = setup_ood
    queue = tmp_path / "q.txt"
    queue.write_text(_line(model, "reuse", text, other, "stage1.steps=0", "stage1_from=maps") + "\n"
                     + _line(model, "maps", text, other, "stage2.steps=0") + "\n")
    runs = tmp_path / "runs"
    lines = []
    assert device.run_queue(queue, runs, echo=lines.append) == {"reuse": "waiting", "maps": "done"}
    assert any("waiting" in m and "maps of maps (stage1_from)" in m for m in lines)
    assert device.run_queue(queue, runs, echo=lambda m: None) == {"reuse": "done", "maps": "done"}


def test_near_the_deadline_an_evaluation_runs_what_fits_and_defers_the_rest(setup_ood, tmp_path, monkeypatch):
    """Tasks the base took long on are left for the next call when they would not fit before the deadline,
    and the short ones still run; the next call finishes the run."""
    import time

    model, text, other = setup_ood
    queue = tmp_path / "q.txt"
    queue.write_text(_line(model, "lin", text, other) + "\n")
    runs = tmp_path / "runs"
    monkeypatch.setenv("LINEARIZE_DEADLINE", str(time.time() + 3600))
    assert device.run_queue(queue, runs, echo=lambda m: None) == {"lin": "done"}
    base = runs / "_base" / device._safe(str(model))
    slow = [f for f in base.glob("passkey*.json")] + [f for f in base.glob("mqar*.json")]
    assert len(slow) == 2
    for f in slow:  # as if the base had taken an hour on passkey and MQAR
        rec = json.loads(f.read_text())
        rec["meter"]["seconds"] = 3600.0
        f.write_text(json.dumps(rec))
    for f in (runs / "lin" / "eval_parts").glob("*.json"):
        if not f.name.startswith("_"):
            f.unlink()
    (runs / "lin" / "eval" / "eval.json").unlink()
    lines = []
    monkeypatch.setenv("LINEARIZE_DEADLINE", str(time.time() + 600))
    assert device.run_queue(queue, runs, echo=lines.append) == {"lin": "eval deferred"}
    done = sorted(f.name.split("-")[0] for f in (runs / "lin" / "eval_parts").glob("*.json") if not f.name.startswith("_"))
    assert len(done) == 2 and all(n.startswith("ppl") for n in done)  # the two perplexities ran
    assert sum("deferred to the next call" in m for m in lines) == 2
    assert not (runs / "lin" / "eval" / "eval.json").exists()
    assert device.progress(runs / "lin")["phase"] == "eval"
    # what the cut call measured is readable now, in the bundle and in its summary's table
    partial = json.loads((runs / "lin" / "eval" / device.PARTIAL).read_text())
    assert len(partial["partial"]["deferred"]) == 2 and all(t.startswith("ppl") for t in partial["results"]["lin"])
    device.bundle([runs / "lin"], tmp_path / "out")
    with tarfile.open(tmp_path / "out" / "runs.tar.gz") as tar:
        assert f"lin/eval/{device.PARTIAL}" in tar.getnames()
    assert "lin (partial: no " in (tmp_path / "out" / "runs-summary.md").read_text()
    monkeypatch.delenv("LINEARIZE_DEADLINE")
    assert device.run_queue(queue, runs, echo=lambda m: None) == {"lin": "done"}
    assert (runs / "lin" / "eval" / "eval.json").exists()
    assert not (runs / "lin" / "eval" / device.PARTIAL).exists()


def test_a_bad_deadline_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("LINEARIZE_DEADLINE", "soon")
    with pytest.raises(ValueError, match="LINEARIZE_DEADLINE") as e:
        device.call_deadline()
    assert "\n" not in str(e.value)
