"""The cache's ring (in-place decode) path on CPU, through the PyTorch ring step.

On CUDA the attention decodes on the ring with the Triton kernel; here ``ring_kernel_serves`` is forced
True in the attention module only, so the same cache logic runs with ``ring_step_torch`` (the ring's own
dispatcher still sees a CPU tensor). Everything must match the ordered-state path.
"""

import pytest
import torch
from transformers import DynamicCache

import linearize
import linearize.modules.attention as attention_mod
from linearize import LinearizeConfig
from linearize.modules.cache import HybridCacheLayer
from linearize.ops.ring import RingState

from ..tiny_models import cache_kw, perturb_added_weights, tiny_model

TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture
def ring_path(monkeypatch):
    monkeypatch.setattr(attention_mod, "ring_kernel_serves", lambda *a: True)


def converted(arch="llama", **cfg):
    model = linearize.convert(tiny_model(arch), LinearizeConfig(**({"feature_dim": 6} | cfg)))
    perturb_added_weights(model)
    return model


def ids_batch(B=2, T=20, seed=0):
    return torch.randint(3, 96, (B, T), generator=torch.Generator().manual_seed(seed))


def hybrid_layers(cache):
    return [layer for layer in cache.layers if isinstance(layer, HybridCacheLayer)]


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
@pytest.mark.parametrize("window", [0, 1, 4])
def test_ring_decode_equals_full_forward(ring_path, arch, window):
    model = converted(arch, window=window)
    ids = ids_batch(T=15)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        out = [model(ids[:, :3], **cache_kw(cache)).logits]
        out += [model(ids[:, t : t + 1], **cache_kw(cache)).logits for t in range(3, 15)]
    torch.testing.assert_close(torch.cat(out, 1), full, **TOL)
    layers = hybrid_layers(cache)
    assert layers and all(isinstance(layer.held, RingState) for layer in layers)
    assert all(layer.state.tail_len == max(window - 1, 0) for layer in layers)  # converted on demand
    assert cache.get_seq_length() == 15


def test_ring_then_chunked_prefill_then_ring(ring_path):
    model = converted(window=5)
    ids = ids_batch(T=30)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        out = [model(ids[:, :8], **cache_kw(cache)).logits]
        out += [model(ids[:, t : t + 1], **cache_kw(cache)).logits for t in range(8, 14)]
        out.append(model(ids[:, 14:21], **cache_kw(cache)).logits)  # the ring hands back to a prefill
        assert not any(isinstance(layer.held, RingState) for layer in hybrid_layers(cache))
        out += [model(ids[:, t : t + 1], **cache_kw(cache)).logits for t in range(21, 30)]
    torch.testing.assert_close(torch.cat(out, 1), full, **TOL)


@pytest.mark.parametrize("kw", [dict(num_beams=3), dict(do_sample=False)], ids=["beams", "greedy"])
def test_generate_matches_the_ordered_path(monkeypatch, kw):
    """Padded batch; beam search reorders the ring (reorder_cache) every step."""
    model = converted(window=3)
    ids = ids_batch(B=3, T=9, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    args = dict(attention_mask=mask, max_new_tokens=8, min_new_tokens=8, pad_token_id=0, **kw)
    with torch.no_grad():
        ordered = model.generate(ids, **args)
        monkeypatch.setattr(attention_mod, "ring_kernel_serves", lambda *a: True)
        calls = []
        step = attention_mod.ring_step
        monkeypatch.setattr(attention_mod, "ring_step", lambda *a, **k: calls.append(1) or step(*a, **k))
        ring = model.generate(ids, **args)
    assert torch.equal(ring, ordered)
    assert len(calls) == 7 * len(linearize.linearized_layers(model))  # every decode step, every layer


def test_layer_ops_on_a_ring(ring_path):
    """batch_select / repeat_interleave / offload + prefetch on a ring equal the same ops on the ordered state."""
    model = converted(window=4)
    ids = ids_batch(B=3, T=12)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(ids[:, :5], **cache_kw(cache))
        for t in range(5, 12):
            model(ids[:, t : t + 1], **cache_kw(cache))
    layer = hybrid_layers(cache)[0]
    assert isinstance(layer.held, RingState) and layer.keys.shape[1] == 4  # mirrors the ring's slots
    ordered = layer.state

    def same(a, b):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=0, atol=0)

    layer.batch_select_indices(torch.tensor([True, False, True]))
    same(layer.state, ordered.index_batch(torch.tensor([0, 2])))
    layer.batch_repeat_interleave(2)
    same(layer.state, ordered.index_batch(torch.tensor([0, 0, 2, 2])))
    layer.offload()
    assert layer.held.S.device.type == "cpu"
    layer.prefetch()
    same(layer.state, ordered.index_batch(torch.tensor([0, 0, 2, 2])))
    layer.reset()
    assert layer.held is None and layer.is_croppable
