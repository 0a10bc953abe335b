"""LINEARIZE_PROFILE=START:COUNT profiles those steps of a training stage and writes a readable report."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from linearize.pipelines.checkpoint import CheckpointManager
from linearize.pipelines.config import StageConfig
from linearize.pipelines.profiling import ENV, StepProfiler, parse_window
from linearize.pipelines.trainer import train_stage


def test_parse_window():
    assert parse_window(None) is None and parse_window("") is None
    assert parse_window("10:3") == (10, 13)
    for bad in ("3", "a:b", "-1:2", "2:0", "1:2:3"):
        with pytest.raises(ValueError, match=f"{ENV}=.*START:COUNT"):
            parse_window(bad)


def _train(tmp_path, steps: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, 16), nn.Linear(16, 11))
    params = dict(model.named_parameters())
    rows = torch.randint(0, 11, (12, 9))

    def loss_fn(m, batch):
        return nn.functional.cross_entropy(m(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())

    return train_stage(
        "stage2", model, params, loss_fn, rows, StageConfig(steps=steps, batch_size=4, lr=1e-2), seed=0,
        checkpoints=CheckpointManager(tmp_path / "checkpoints"), checkpoint_every=100,
        metrics_path=tmp_path / "metrics.jsonl", device=torch.device("cpu"),
    )


def test_training_writes_the_profile_of_the_asked_steps(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, "1:2")
    _train(tmp_path, steps=5)
    text = (tmp_path / "profile-stage2-rank0.md").read_text()
    assert "# Profile: stage2, rank 0, steps 1..2" in text
    assert "wall time a step" in text and "Top ops by host" in text
    assert "aten::mm" in text or "aten::addmm" in text  # the Linear's matmul is among the host ops


def test_a_window_past_the_end_is_cut_at_the_last_step(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, "2:10")
    _train(tmp_path, steps=4)
    assert "steps 2..3" in (tmp_path / "profile-stage2-rank0.md").read_text()


def test_no_profile_unless_asked(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    _train(tmp_path, steps=2)
    assert not list(tmp_path.glob("profile-*"))


def test_bad_spec_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, "soon")
    with pytest.raises(ValueError, match="START:COUNT"):
        _train(tmp_path, steps=2)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_profiler_is_inert_outside_its_window(tmp_path):
    prof = StepProfiler("s", tmp_path, spec="5:1")
    for step in range(3):
        prof.before(step)
        assert prof.after(step) is None
    assert prof.prof is None and not list(tmp_path.iterdir())


def test_bad_spec_stops_a_conversion_before_it_loads_anything(tmp_path, monkeypatch):
    from linearize.pipelines.config import build_config
    from linearize.pipelines.run import RunError, run_conversion

    monkeypatch.setenv(ENV, "10")
    loaded = []
    with pytest.raises(RunError, match=f"{ENV}='10'"):
        run_conversion(build_config(None, None, [], model="smollm2-135m"), tmp_path / "run", echo=lambda m: None,
                       model_loader=lambda *a, **k: loaded.append(1))
    assert not loaded and not (tmp_path / "run").exists()
