"""The real SmolLM2-135M (fetched from PyPI, dequantized from GGUF): conversion is exact before training."""

import copy

import pytest
import torch

import linearize
from linearize import LinearizeConfig

from ..tiny_models import cache_kw

pytestmark = pytest.mark.slow

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife."


def test_converted_smollm2_reproduces_base_logits_with_window_over_sequence(smollm2):
    base, tok = smollm2
    assert base.config.model_type == "llama" and base.config.num_hidden_layers == 30
    ids = tok(TEXT, return_tensors="pt").input_ids
    model = linearize.convert(copy.deepcopy(base), LinearizeConfig(window=ids.shape[1]))
    assert len(linearize.linearized_layers(model)) == 30
    with torch.no_grad():
        want = base(ids).logits
        got = model(ids).logits
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_converted_smollm2_small_window_is_finite_and_decodes_like_forward(smollm2):
    base, tok = smollm2
    ids = tok(TEXT, return_tensors="pt").input_ids
    model = linearize.convert(copy.deepcopy(base), LinearizeConfig(window=8))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :10])
        cache, steps = out.past_key_values, [out.logits]
        for t in range(10, ids.shape[1]):
            steps.append(model(ids[:, t : t + 1], **cache_kw(cache)).logits)
    assert torch.isfinite(full).all()
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-3, atol=1e-3)
