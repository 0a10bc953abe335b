"""Every YAML under configs/ (the run recipes the README and the device queues name) loads through the same
path as ``linearize convert --config``: a renamed or mistyped field fails here, not on a lent GPU."""

from pathlib import Path

import pytest

from linearize.pipelines.config import build_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def test_configs_exist():
    assert len(CONFIGS) > 10


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_loads(path):
    cfg = build_config("full", path)
    assert cfg.stage1.steps >= 0 and cfg.stage2.steps >= 0


def test_gemma_retrieval_recipe_is_transfer_only_with_its_layers_kept():
    cfg = build_config("full", ROOT / "configs/gemma3-270m-retrieval.yaml")
    assert cfg.stage2.steps == 0 and cfg.linearize.softmax_layers == [5, 11] and not cfg.linearize.feature_rope
