"""Tiny random-weight models of every supported architecture, for fast CPU tests."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

TINY = dict(
    vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
ARCH_EXTRA = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    # 2 local layers (window 6) around 1 global layer, like Gemma 3's 5:1 pattern
    "gemma3_text": {"sliding_window": 6, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"], "query_pre_attn_scalar": 16},
}
ARCHS = list(ARCH_EXTRA)


def tiny_model(model_type: str, seed: int = 0, **overrides):
    """A random tiny model in fp32, eval mode; weights scaled up so attention is far from uniform."""
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(model_type, **(TINY | ARCH_EXTRA[model_type] | overrides))
    model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)
    return model


def tiny_config_json(path: Path, model_type: str = "llama") -> Path:
    """The tiny model's config as a ``benchmarks/configs/*.json``-style file (for ``benchmarks.random_model``)."""
    path.write_text(json.dumps({"model_type": model_type, **TINY, **ARCH_EXTRA[model_type]}))
    return path


def perturb_added_weights(model, scale=0.3, seed=1):
    """Move the conversion's weights off their initial values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(m in name for m in ("feature_map", "window_logit", "length_alpha", "sink_u", "sink_c")):
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device))


def cache_kw(cache) -> dict:
    """``{keyword: cache}`` for a causal LM's forward, by the name the installed transformers takes: ``cache``
    since 5.24, where ``past_key_values`` warns (and goes in 5.40); ``past_key_values`` before."""
    from linearize.models import cache_kwarg

    return {cache_kwarg(): cache}
