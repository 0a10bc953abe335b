"""``_new_token_mask``: a decode step keeps the mask as a tensor (no host read of its values), so the step has
no device sync and can be captured in a CUDA graph; prefill still drops an all-valid mask."""

import pytest
import torch
from transformers import DynamicCache

import linearize
from linearize import LinearizeConfig
from linearize.modules.attention import _new_token_mask

from ..tiny_models import cache_kw, perturb_added_weights, tiny_model


def _no_bool(monkeypatch):
    """Make any host read of a tensor's truth value fail (on CUDA that read is a device sync)."""

    def refuse(self):
        raise AssertionError("host read of a tensor's value")

    monkeypatch.setattr(torch.Tensor, "__bool__", refuse)


def test_decode_mask_is_kept_without_reading_it(monkeypatch):
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    _no_bool(monkeypatch)
    m = _new_token_mask(mask, 2, 1)
    monkeypatch.undo()
    assert m is not None and m.dtype == torch.bool and m.shape == (2, 1) and bool(m.all())


def test_prefill_drops_an_all_valid_mask_and_keeps_padding():
    assert _new_token_mask(torch.ones(2, 5, dtype=torch.long), 2, 4) is None
    padded = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert torch.equal(_new_token_mask(padded, 2, 4), padded.bool())
    assert _new_token_mask(None, 2, 1) is None
    with pytest.raises(ValueError, match="does not cover"):
        _new_token_mask(torch.ones(3, 5), 2, 1)


def test_decode_step_with_all_valid_mask_equals_no_mask():
    """The kept all-True mask gives bitwise the same decode logits as no mask (torch path)."""
    model = linearize.convert(tiny_model("llama"), LinearizeConfig(window=4, feature_dim=6))
    perturb_added_weights(model)
    ids = torch.randint(3, 96, (3, 12))
    outs = []
    with torch.no_grad():
        for use_mask in (False, True):
            cache = DynamicCache(config=model.config)
            mask = torch.ones_like(ids) if use_mask else None
            model(ids[:, :9], attention_mask=None if mask is None else mask[:, :9], **cache_kw(cache))
            steps = [model(ids[:, t : t + 1], attention_mask=None if mask is None else mask[:, : t + 1], **cache_kw(cache)).logits
                     for t in range(9, 12)]
            outs.append(torch.cat(steps, 1))
    assert torch.equal(outs[0], outs[1])
