"""Shared by the tests of options that keep per-row counts in the cache (length_norm, sink_tokens)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import linearize.modules.attention as attention_mod

from ..ops.helpers import left_pad_mask
from ..tiny_models import cache_kw


def ids_and_mask(B=3, T=21, pads=(0, 5, 12), seed=0):
    """Random token ids [B, T] left-padded by ``pads`` (pad id 0) and their mask."""
    ids = torch.randint(3, 96, (B, T), generator=torch.Generator().manual_seed(seed))
    mask = left_pad_mask(B, T, pads).long()
    ids[mask == 0] = 0
    return ids, mask


def brute_counts(mask: torch.Tensor, window: int) -> torch.Tensor:
    """length_norm's n[b, i] = valid keys j with j <= i - window, by a loop."""
    B, T = mask.shape
    n = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        for i in range(T):
            n[b, i] = int(mask[b, : max(i - window + 1, 0)].sum())
    return n


@pytest.fixture(params=["ordered", "ring"])
def decode_path(request, monkeypatch):
    if request.param == "ring":  # the in-place ring step (ring_step_torch on CPU), as on CUDA
        monkeypatch.setattr(attention_mod, "ring_kernel_serves", lambda *a: True)
    return request.param


def cached(model, ids, mask, cuts):
    """Prefill in pieces ending at each cut, then decode token by token; logits [B, T, V]."""
    T = ids.shape[1]
    cache = DynamicCache(config=model.config)
    out, start = [], 0
    with torch.no_grad():
        for end in list(cuts) + list(range(cuts[-1] + 1, T + 1)):
            out.append(model(ids[:, start:end], attention_mask=mask[:, :end], **cache_kw(cache)).logits)
            start = end
    return torch.cat(out, 1), cache


def assert_padded_generation_equals_unpadded(model, lengths):
    """A left-padded batch of prompts of ``lengths`` generates what each prompt does alone."""
    prompts = [torch.randint(3, 96, (n,), generator=torch.Generator().manual_seed(n)) for n in lengths]
    L = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, L - len(p) :], mask[i, L - len(p) :] = p, 1
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, **kw)
        for i, p in enumerate(prompts):
            single = model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **kw)
            assert torch.equal(batched[i, L:], single[0, len(p) :]), f"sequence {i}"
