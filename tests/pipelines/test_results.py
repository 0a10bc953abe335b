"""The results table over run directories (scripts/results_table.py): ratios to base and issue 6's goals."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from linearize.pipelines.results import load_run, run_row, write_table

BASE = {"piqa": {"acc": 0.66}, "arc_easy": {"acc": 0.50}, "arc_challenge": {"acc_norm": 0.28}, "hellaswag": {"acc_norm": 0.42},
        "winogrande": {"acc": 0.52}, "lambada": {"acc": 0.30}, "mmlu": {"acc": 0.26},
        "ppl:austen+sharegpt@512,2048,4096": {"ppl@512": 20.0, "ppl@2048": 15.0, "ppl@4096": 16.0},
        "ppl:pydocs@512,2048,4096": {"ppl@512": 9.0, "ppl@2048": 7.0, "ppl@4096": 7.5},
        "passkey@1024,2048,4096": {"acc": 1.0, "acc@4096": 1.0}, "mqar": {"acc": 0.90}}


def _run(root: Path, name: str, cand: dict, *, report: bool = True, roles: bool = True, convert: bool = True) -> Path:
    d = root / name
    (d / "eval").mkdir(parents=True)
    ev = {"models": ["smollm2-135m", name], "tasks": list(BASE), "results": {"smollm2-135m": BASE, name: cand}, "settings": {"limit": None}}
    if roles:
        ev |= {"roles": {"base": "smollm2-135m", "linearized": name},
               "ppl_roles": {"in_domain": "ppl:austen+sharegpt@512,2048,4096", "out_of_domain": "ppl:pydocs@512,2048,4096"}}
    (d / "eval" / "eval.json").write_text(json.dumps(ev))
    if report:
        (d / "report.json").write_text(json.dumps({
            "model": "smollm2-135m", "convert": convert,
            "linearize": {"window": 64, "feature_map": "hedgehog", "feature_dim": 64} if convert else None,
            "config": {"convert": convert, "data": {"source": "austen+sharegpt", "eval_ood_source": "pydocs", "seq_len": 1024}},
            "stages": {"stage1": {"steps": 200, "tokens": 1_638_400, "seconds": 54.0}, "stage2": {"steps": 200, "tokens": 1_638_400, "seconds": 90.0}},
            "evals": {"base": {"ppl": 18.0}, "stage2": {"ppl": 19.0}}, "evals_ood": {"base": {"ppl": 8.0}, "stage2": {"ppl": 9.0}},
            "wall_seconds": 300.0, "environment": {"device": "NVIDIA H100 80GB HBM3"},
        }))
    return d


def _scaled(factor_acc: float, factor_ppl: float, passkey: float, mqar: float) -> dict:
    out = {}
    for task, m in BASE.items():
        if task.startswith("ppl:"):
            out[task] = {k: v * factor_ppl for k, v in m.items()}
        else:
            out[task] = {k: v * factor_acc for k, v in m.items()}
    out["passkey@1024,2048,4096"] = {"acc": passkey, "acc@4096": passkey}
    out["mqar"] = {"acc": mqar}
    return out


def test_goals_and_margins(tmp_path):
    good = run_row(load_run(_run(tmp_path, "good", _scaled(1.01, 1.04, 0.95, 0.91))))
    assert good["goals_met"] == good["goals_measured"] == 5
    assert good["ratios"]["zeroshot_avg"] == pytest.approx(1.01) and good["ratios"]["ppl@2048"] == pytest.approx(1.04)
    assert good["goals"]["mqar"]["value"] == pytest.approx(0.01)
    assert good["train_tokens"] == 3_276_800 and good["train_seconds"] == 144.0
    bad = run_row(load_run(_run(tmp_path, "bad", _scaled(0.96, 2.7, 0.0, 0.07))))
    assert bad["goals_met"] == 1 and bad["goals"]["mmlu_lambada"]["value"] == pytest.approx(0.96)
    assert {k: g["met"] for k, g in bad["goals"].items()} == {"zeroshot": False, "mmlu_lambada": True, "ppl2k": False, "passkey4k": False, "mqar": False}


def test_partial_runs_and_old_reports(tmp_path):
    cand = {k: v for k, v in _scaled(1.0, 1.0, 1.0, 0.9).items() if k in ("mqar", "ppl:austen+sharegpt@512,2048,4096")}
    row = run_row(load_run(_run(tmp_path, "partial", cand, roles=False)))  # an eval.json without roles: matched by the config
    assert row["ppl_in_domain"] == "ppl:austen+sharegpt@512,2048,4096" and row["ppl_out_of_domain"] == "ppl:pydocs@512,2048,4096"
    assert row["goals"]["zeroshot"]["met"] is None and row["goals"]["ppl2k"]["met"] is True and row["goals_measured"] == 2
    only_report = _run(tmp_path, "noeval", {}, report=True)
    (only_report / "eval" / "eval.json").unlink()
    assert "goals" not in run_row(load_run(only_report))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="report.json"):
        load_run(tmp_path / "empty")


def test_an_evaluation_cut_by_the_deadline_is_a_partial_row(tmp_path):
    """eval/partial.json (written when a device call defers tasks) stands in for eval.json: the row says which
    tasks it lacks, a goal is decided only by what was measured, and a finished eval.json wins over it."""
    cand = {k: v for k, v in _scaled(1.0, 1.1, 0.14, 0.12).items() if k not in ("hellaswag", "mmlu")}
    cand["lambada"] = {"acc": 0.30 * 0.78}
    d = _run(tmp_path, "cut", cand)
    ev = json.loads((d / "eval" / "eval.json").read_text())
    (d / "eval" / "eval.json").unlink()
    (d / "eval" / "partial.json").write_text(json.dumps({**ev, "partial": {"deferred": ["cut: hellaswag", "cut: mmlu"]}}))
    row = run_row(load_run(d))
    assert row["partial"] == ["cut: hellaswag", "cut: mmlu"]
    assert row["goals"]["zeroshot"]["met"] is None  # HellaSwag missing: no average
    assert row["goals"]["mmlu_lambada"]["met"] is False and row["goals"]["mmlu_lambada"]["value"] == pytest.approx(0.78)
    assert row["goals_measured"] == 4 and row["goals_met"] == 0
    write_table([d], tmp_path / "out")
    md = (tmp_path / "out" / "results.md").read_text()
    assert md.count("cut (partial: no hellaswag, mmlu)") == 2  # the results row and the goals row
    # a LAMBADA that passes says nothing about the goal while MMLU is missing
    cand["lambada"] = {"acc": 0.30}
    ev["results"]["cut"] = cand
    (d / "eval" / "partial.json").write_text(json.dumps({**ev, "partial": {"deferred": ["cut: mmlu"]}}))
    assert run_row(load_run(d))["goals"]["mmlu_lambada"]["met"] is None
    (d / "eval" / "eval.json").write_text(json.dumps(ev))
    assert "partial" not in run_row(load_run(d))


def test_table_json_and_plot_through_the_script(tmp_path):
    dirs = [_run(tmp_path, "abl-plain", _scaled(0.98, 1.3, 0.2, 0.5)), _run(tmp_path, "abl-control", _scaled(1.02, 0.97, 1.0, 0.9), convert=False)]
    out = tmp_path / "table"
    script = Path(__file__).resolve().parents[2] / "scripts" / "results_table.py"
    proc = subprocess.run([sys.executable, str(script), *map(str, dirs), "--out", str(out), "--title", "SmolLM2 ablations"],
                          capture_output=True, text=True, check=True)
    md = (out / "results.md").read_text()
    assert proc.stdout.startswith("# SmolLM2 ablations") and md.count("| abl-") == 4  # one row in each table
    assert "softmax control: LoRA only (200+200 steps)" in md and "w64 hedgehog/f64 (200+200 steps @ 1024)" in md
    assert "✗ 1.300x" in md and "✓ 0.970x" in md and "✗ -40.0 pts" in md
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["run"] for r in rows] == ["abl-plain", "abl-control"]
    assert (out / "results.png").stat().st_size > 5000
    bad = subprocess.run([sys.executable, str(script), str(tmp_path / "missing"), "--out", str(out)], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no such run directory" in bad.stderr


def test_the_table_reads_the_quick_h100_run(tmp_path):
    rows = write_table([Path(__file__).resolve().parents[2] / "results/smollm2-135m-h100-quick"], tmp_path)
    assert rows[0]["ratios"]["ppl@2048"] == pytest.approx(39.68 / 14.61, rel=1e-3)
    assert rows[0]["goals"]["passkey4k"]["met"] is False


def test_recipe_names_every_setting_an_ablation_changes():
    from linearize.pipelines.results import recipe

    base = {"config": {"data": {"seq_len": 1024}}, "stages": {"stage1": {"steps": 200}, "stage2": {"steps": 200}}}
    lin = {"window": 64, "feature_map": "hedgehog", "feature_dim": 64, "feature_rope": False, "softmax_layers": [7, 15, 23]}
    assert recipe(base | {"linearize": lin}) == "w64 hedgehog/f64 nope softmax3 (200+200 steps @ 1024)"
    assert recipe(base | {"linearize": lin | {"feature_rope": True, "softmax_layers": []}}) == "w64 hedgehog/f64 (200+200 steps @ 1024)"
    lora_lin = {"config": base["config"] | {"lora": {"layers": "linearized"}}}
    assert recipe(base | lora_lin | {"linearize": lin}) == "w64 hedgehog/f64 nope softmax3 lora:lin (200+200 steps @ 1024)"
    kv = lin | {"feature_map_per_kv_head": True}
    distilled = {"config": lora_lin["config"] | {"stage2_loss": {"ce_weight": 0.1, "kl_weight": 1.0}, "stage2": {"lr": 3e-4}}}
    assert recipe(base | distilled | {"linearize": kv}) == "w64 hedgehog/f64 nope kvmaps softmax3 lora:lin 0.1ce+kl lr0.0003 (200+200 steps @ 1024)"
    plain_kl = {"config": base["config"] | {"stage2_loss": {"ce_weight": 0.0, "kl_weight": 1.0}, "stage2": {"lr": 1e-4}}}
    assert recipe(base | plain_kl | {"linearize": lin}) == "w64 hedgehog/f64 nope softmax3 kl (200+200 steps @ 1024)"
    heads = lin | {"softmax_layers": [], "softmax_heads": [[9, 1], [16, 0], [16, 1]], "feature_map_per_kv_head": True}
    assert recipe(base | plain_kl | {"linearize": heads}) == "w64 hedgehog/f64 nope kvmaps heads3 kl (200+200 steps @ 1024)"


def test_the_default_stage2_lr_is_the_configs():
    from linearize.pipelines.config import RunConfig
    from linearize.pipelines.results import STAGE2_LR

    assert RunConfig().stage2.lr == STAGE2_LR


def test_a_base_at_chance_on_mmlu_is_said_so(tmp_path):
    from linearize.pipelines.results import markdown

    row = run_row(load_run(_run(tmp_path, "r", _scaled(1.0, 1.0, 1.0, 0.9))))
    assert "MMLU: the base" not in markdown([row])  # no stderr: nothing claimed
    row["base"] |= {"mmlu": 0.248, "mmlu_stderr": 0.004}
    assert "scores 24.8 ± 0.4, within two standard errors of chance (25%" in markdown([row])
    row["base"] |= {"mmlu": 0.45}
    assert "MMLU: the base" not in markdown([row])


def test_a_base_only_evaluation_is_a_base_row_not_a_run(tmp_path):
    """`device queue --base-only` leaves eval.json with one model and no report: the base models' table has
    it, the runs and goals tables do not."""
    from linearize.pipelines.results import markdown

    d = tmp_path / "gemma-base"
    (d / "eval").mkdir(parents=True)
    (d / "eval" / "eval.json").write_text(json.dumps({
        "models": ["gemma3-270m"], "results": {"gemma3-270m": BASE}, "roles": {"base": "gemma3-270m"},
        "ppl_roles": {"in_domain": "ppl:austen+sharegpt@512,2048,4096", "out_of_domain": "ppl:pydocs@512,2048,4096"}}))
    row = run_row(load_run(d))
    assert row["base_only"] and row["model"] == "gemma3-270m" and row["converted"] is None
    md = markdown([row, run_row(load_run(_run(tmp_path, "r", _scaled(1.0, 1.0, 1.0, 0.9))))])
    assert "| gemma-base |" not in md and "| r |" in md
    assert "| gemma3-270m | 20.00 | 15.00 |" in md and "| None |" not in md


def test_plots_stay_readable_with_many_runs_and_models(tmp_path):
    """The length plot gets one row of panels per model and the bar plot grows down, not across: at 40 runs the
    bar plot was 11,688 px wide and the length plot's one legend covered its axes."""
    from PIL import Image

    dirs = []
    for i in range(40):
        d = _run(tmp_path, f"run{i:02d}", _scaled(0.95 + i / 400, 1.0 + i / 40, 1.0, 0.9))
        if i >= 25:  # a second model: its own row of length panels
            rep = json.loads((d / "report.json").read_text())
            (d / "report.json").write_text(json.dumps(rep | {"model": "gemma3-270m"}))
        dirs.append(d)
    write_table(dirs[:25], tmp_path / "one")
    write_table(dirs, tmp_path / "two")
    bars = Image.open(tmp_path / "two" / "results.png").size
    one, two = (Image.open(tmp_path / k / "results-length.png").size for k in ("one", "two"))
    assert bars[0] <= 1600 and bars[1] > bars[0]  # 40 runs: rows of bars, a readable width
    assert one[0] == two[0] and two[1] > one[1] * 1.4  # the second model adds a row of panels below
