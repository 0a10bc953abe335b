import json

import pytest
from typer.testing import CliRunner

from linearize.eval.report import markdown
from linearize.eval.run import check_tasks, evaluate
from tests.pipelines.tiny_run import make_model_dir, make_text


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalmodel")
    return make_model_dir(root / "model"), make_text(root / "text.txt", paragraphs=30)


def test_unknown_task_and_bad_specs_are_one_line_errors():
    for bad in (["nope"], ["ppl:x@a"], ["passkey@0"], []):
        with pytest.raises(ValueError) as e:
            check_tasks(bad)
        assert "\n" not in str(e.value)


def test_missing_model_is_one_line_error(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        evaluate([str(tmp_path / "nothing")], ["ppl:x.txt@16"], limit=1)
    assert "\n" not in str(e.value)


def test_evaluate_writes_report(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir, text = tiny_dir
    tasks = [f"ppl:{text}@16,32", "passkey@64", "mqar@2,4"]
    rep = evaluate([str(model_dir), str(model_dir)], tasks, limit=4, out=tmp_path / "ev", device="cpu", progress=False)
    assert len(rep["models"]) == 2 and rep["models"][0] != rep["models"][1]
    saved = json.loads((tmp_path / "ev" / "eval.json").read_text())
    r = saved["results"][rep["models"][0]][tasks[0]]
    assert r["stride@16"] == 8 and r["windows@32"] <= 4 and r["ppl@16"] > 1
    md = (tmp_path / "ev" / "eval.md").read_text()
    assert "ppl@16" in md and "passkey@64" in md and md.count("|") > 10
    assert (tmp_path / "ev" / "eval.png").stat().st_size > 1000
    # throughput and peak memory per model and per task
    res = saved["resources"][rep["models"][0]]
    assert res["params"] > 0 and res["peak_mem_mb"] > 0 and res["memory"] == "cpu_peak_rss"
    for task in tasks:
        t = res["tasks"][task]
        assert t["tokens"] > 0 and t["tokens_per_s"] > 0 and t["peak_mem_mb"] > 0 and t["forwards"] >= 1
    assert "## Speed and memory (cpu, float32)" in md and "tok/s" in md
    with pytest.raises(ValueError, match="max_position_embeddings"):
        evaluate([str(model_dir)], [f"ppl:{text}@4096"], limit=1, device="cpu", progress=False)
    with pytest.raises(FileNotFoundError):
        evaluate([str(model_dir)], ["ppl:missing.txt@16"], limit=1, device="cpu", progress=False)


def test_cli_eval_cmd(tiny_dir, tmp_path, monkeypatch):
    import typer

    from linearize.eval.cli import eval_cmd

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    app = typer.Typer()
    app.command("eval")(eval_cmd)
    app.command("other")(lambda: None)
    model_dir, text = tiny_dir
    res = CliRunner().invoke(app, ["eval", str(model_dir), "--tasks", f"ppl:{text}@16,mqar@2", "--limit", "2", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o" / "eval.json").exists()
    res = CliRunner().invoke(app, ["eval", str(model_dir), "--tasks", "bogus"])
    assert res.exit_code == 2 and "unknown task" in res.output


def test_markdown_models_side_by_side():
    rep = {"results": {"a": {"arc_easy": {"acc": 0.5, "acc_stderr": 0.1, "n": 10}}, "b": {"arc_easy": {"acc": 0.25, "n": 10}}}, "settings": {"limit": 10}}
    md = markdown(rep)
    assert "| task | metric | a | b |" in md and "50.0 ± 10.0" in md and "25.0" in md


def test_task_lists_keep_their_at_lists_across_commas():
    from linearize.eval.cli import expand_tasks

    got = expand_tasks(["ppl:austen@512,2048,passkey@1024,4096,mqar@4,16", "piqa"])
    assert got == ["ppl:austen@512,2048", "passkey@1024,4096", "mqar@4,16", "piqa"]
    assert expand_tasks(["zeroshot,lambada"])[:2] == ["arc_easy", "arc_challenge"]


def test_the_plot_shows_one_accuracy_a_task_and_its_breakdowns_in_numeric_order():
    from linearize.eval.report import plot_rows

    results = {"m": {
        "hellaswag": {"acc": 0.3, "acc_norm": 0.4, "acc_bytes": 0.4, "n": 10},
        "piqa": {"acc": 0.6, "acc_norm": 0.6, "acc_stderr": 0.01},
        "mqar@4,16,8": {"acc": 0.9, "acc@16": 0.8, "acc@4": 1.0, "acc@8": 0.9},
        "ppl:text@512,2048": {"ppl@2048": 5.0, "ppl@512": 6.0, "tokens@512": 100, "source_tokens": 9},
        "lambada": {"acc": 0.3, "perplexity": 20.0},
    }}
    acc, ppl = plot_rows(results)
    assert acc == [("hellaswag", "acc_norm"), ("piqa", "acc"), ("mqar@4,16,8", "acc"), ("mqar@4,16,8", "acc@4"),
                   ("mqar@4,16,8", "acc@8"), ("mqar@4,16,8", "acc@16"), ("lambada", "acc")]
    assert ppl == [("ppl:text@512,2048", "ppl@512"), ("ppl:text@512,2048", "ppl@2048"), ("lambada", "perplexity")]
