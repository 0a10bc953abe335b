"""``stage1_from``: a run that starts from another run's trained feature maps instead of training stage 1."""

import json

import pytest
import torch
from safetensors.torch import load_file

from linearize.pipelines.config import build_config
from linearize.pipelines.run import RunError, run_conversion

from .tiny_run import tiny_overrides


pytestmark = pytest.mark.usefixtures("own_cache")


def _run(model_dir, text, out, steps1, steps2, *extra):
    cfg = build_config(None, None, tiny_overrides(text, steps1, steps2) + list(extra), model=str(model_dir))
    return run_conversion(cfg, out, echo=lambda m: None)


def test_a_run_from_another_runs_maps_equals_training_them_itself(setup, tmp_path):
    model_dir, text = setup
    src = _run(model_dir, text, tmp_path / "runs" / "src", 6, 0)
    # a bare sibling name: looked up beside this run's --out, as queued device runs name each other
    reuse = _run(model_dir, text, tmp_path / "runs" / "reuse", 0, 4, "stage1_from=src")
    whole = _run(model_dir, text, tmp_path / "runs" / "whole", 6, 4)
    a, b = load_file(tmp_path / "runs" / "src" / "stage1_final.safetensors"), load_file(tmp_path / "runs" / "reuse" / "stage1_final.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the adopted maps give the source's stage-1 model, and the record counts the steps they were trained with
    assert reuse["evals"]["stage1"] == src["evals"]["stage1"] == whole["evals"]["stage1"]
    st = reuse["stages"]["stage1"]
    assert st["steps"] == 6 and st["tokens"] == src["stages"]["stage1"]["tokens"] > 0
    assert st["from"].endswith("src/stage1_final.safetensors")
    # stage 2 goes on from there exactly as in a run that trained its own stage 1
    assert reuse["stages"]["stage2"]["steps"] == 4
    torch.testing.assert_close(torch.tensor(reuse["evals"]["stage2"]["loss"]), torch.tensor(whole["evals"]["stage2"]["loss"]), rtol=1e-5, atol=0)
    assert "| stage1 (maps of `src`, stage1_from) | 6 |" in (tmp_path / "runs" / "reuse" / "report.md").read_text()
    saved = json.loads((tmp_path / "runs" / "reuse" / "state.json").read_text())
    assert saved["stages"]["stage1"]["from"] == st["from"]


def test_stage1_from_an_absolute_file_path_and_on_resume(setup, tmp_path):
    model_dir, text = setup
    _run(model_dir, text, tmp_path / "src", 4, 0)
    file = str(tmp_path / "src" / "stage1_final.safetensors")
    first = _run(model_dir, text, tmp_path / "reuse", 0, 2, f"stage1_from={file}")
    cfg = build_config(None, None, tiny_overrides(text, 0, 2) + [f"stage1_from={file}"], model=str(model_dir))
    again = run_conversion(cfg, tmp_path / "reuse", resume=True, echo=lambda m: None)
    assert again["evals"] == first["evals"] and again["stages"]["stage1"]["from"] == file


def test_stage1_from_bad_sources_are_one_line_errors(setup, tmp_path):
    model_dir, text = setup
    with pytest.raises(RunError, match="not found") as e:
        _run(model_dir, text, tmp_path / "runs" / "a", 0, 2, "stage1_from=nowhere")
    assert "\n" not in str(e.value)
    (tmp_path / "runs" / "half").mkdir(parents=True)
    with pytest.raises(RunError, match="has not finished its stage 1"):
        _run(model_dir, text, tmp_path / "runs" / "b", 0, 2, "stage1_from=half")
    (tmp_path / "runs" / "junk").mkdir()
    (tmp_path / "runs" / "junk" / "stage1_final.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(RunError, match="not a readable safetensors"):
        _run(model_dir, text, tmp_path / "runs" / "c", 0, 2, "stage1_from=junk")
    _run(model_dir, text, tmp_path / "runs" / "f4", 2, 0)
    with pytest.raises(RunError, match="do not fit this model") as e:
        _run(model_dir, text, tmp_path / "runs" / "d", 0, 2, "stage1_from=f4", "linearize.feature_dim=8")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("extra,match", [
    (["stage1.steps=3"], "stage1.steps=0"),
    (["stage1.steps=0", "transfer_block=[0, 1]"], "transfer_block"),
    (["stage1.steps=0", "convert=false"], "convert=true"),
])
def test_stage1_from_bad_settings_are_one_line_errors(extra, match):
    with pytest.raises(ValueError, match=match) as e:
        build_config(None, None, ["stage1_from=runs/x", *extra]).check()
    assert "\n" not in str(e.value)


def test_stage1_from_with_two_sharded_processes_equals_one(setup, tmp_path):
    """The sharded placement builds its models from the adopted file: the same stage 2 as one process."""
    import torch.distributed as dist

    from .test_distributed import losses, one_and_two_processes
    from .test_resume import env

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    model_dir, text = setup
    _run(model_dir, text, tmp_path / "runs" / "src", 4, 0)
    one, two = tmp_path / "runs" / "one", tmp_path / "runs" / "two"
    one_and_two_processes(model_dir, one, two, tiny_overrides(text, 0, 4) + ["stage1_from=src", "stage2.batch_size=4"],
                          env(tmp_path / "cache"))
    l1, l2 = losses(one, "stage2"), losses(two, "stage2")
    assert len(l1) == len(l2) == 4
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=1e-5, atol=0)
    r1, r2 = (json.loads((p / "report.json").read_text()) for p in (one, two))
    assert r2["environment"]["processes"] == 2 and r2["stages"]["stage1"]["from"] == r1["stages"]["stage1"]["from"]
    assert r2["evals"]["stage1"]["ppl"] == pytest.approx(r1["evals"]["stage1"]["ppl"], rel=1e-5)
