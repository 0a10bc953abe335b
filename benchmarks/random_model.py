"""A model built from a config.json alone, with random weights: what the speed benchmarks need, since a
step costs the same whatever the weights hold, and no checkpoint has to travel to the GPU machine."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def random_model(config_json: str | Path, dtype: torch.dtype, seed: int | None = None, init_device: str | None = None):
    """``AutoModelForCausalLM.from_config`` on a config.json (e.g. benchmarks/configs/smollm2-135m.json), SDPA
    attention, returned on the CPU. ``seed`` seeds the initialization, so two calls give the same weights (a base
    and its twin). ``init_device`` ("cuda"): draw the weights there and copy them back, which takes seconds
    where the CPU's initialization takes ~20 s a 0.5B model (~5 min for an 8B one); "meta": shapes only, left there
    (byte counts of layouts, ``scripts/cache_bytes.py``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = json.loads(Path(config_json).read_text())
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(init_device or "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model if init_device == "meta" else model.to("cpu")
