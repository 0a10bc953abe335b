"""The kept softmax layers' attention function: when it takes the kernel, its SDPA fallback, the context
that sets it, and the reference op against torch's SDPA. (The kernel itself: tests/ops/test_triton_softmax_decode_*.)"""

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from linearize.modules import softmax_decode as sd
from linearize.ops.softmax_decode import softmax_decode_reference

from ..tiny_models import tiny_model


def _qkv(B=3, H=6, Hkv=2, T=1, L=11, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, T, D, generator=g), torch.randn(B, Hkv, L, D, generator=g), torch.randn(B, Hkv, L, D, generator=g)


def test_reference_equals_sdpa_with_grouped_heads():
    q, k, v = _qkv()
    mask = torch.rand(3, 11, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[:, -1] = True
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], enable_gqa=True, scale=0.4)
    torch.testing.assert_close(softmax_decode_reference(q, k, v, mask, scale=0.4), ref.transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_bad_shapes_are_one_line_errors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="one decode token"):
        softmax_decode_reference(torch.randn(3, 6, 2, 8), k, v)
    with pytest.raises(ValueError, match="do not group"):
        softmax_decode_reference(torch.randn(3, 5, 1, 8), k, v)
    with pytest.raises(ValueError, match="bool"):
        softmax_decode_reference(q, k, v, torch.ones(3, 11))


def test_when_the_kernel_serves(monkeypatch):
    monkeypatch.setattr(sd, "_device_ok", lambda q: True)
    q, k, _ = _qkv()
    ok = lambda m=None, **kw: sd.kernel_serves(q, k, m, 0.0, kw)  # noqa: E731
    assert ok() and ok(torch.ones(3, 1, 1, 11, dtype=torch.bool)) and ok(torch.ones(1, 1, 1, 11, dtype=torch.bool))
    assert not ok(torch.zeros(3, 1, 1, 11))  # an additive float mask
    assert not ok(torch.ones(3, 1, 2, 11, dtype=torch.bool)) and not ok(torch.ones(3, 1, 1, 10, dtype=torch.bool))
    assert not ok(sliding_window=4) and not ok(softcap=30.0)
    assert not sd.kernel_serves(*_qkv(T=2)[:2], None, 0.0, {})  # a prefill
    assert not sd.kernel_serves(q, k, None, 0.1, {})  # dropout
    monkeypatch.setattr(sd, "_device_ok", lambda q: False)
    assert not ok()  # CPU without the interpreter


def test_the_fallback_is_sdpa():
    q, k, v = _qkv()
    mask = torch.ones(3, 1, 1, 11, dtype=torch.bool)
    mask[0, ..., :4] = False
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 3
    got, _ = sd.decode_attention_forward(module, q, k, v, mask, scaling=0.3)
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got, softmax_decode_reference(q, k, v, mask[:, 0, 0], scale=0.3), rtol=1e-5, atol=1e-6)


def test_the_context_sets_and_restores_sdpa_layers_only():
    model = tiny_model("llama")
    assert model.config._attn_implementation == "sdpa"
    with sd.softmax_decode_kernel(model, [0]):
        assert model.config._attn_implementation == sd.NAME
    assert model.config._attn_implementation == "sdpa"
    model.set_attn_implementation("eager")
    with sd.softmax_decode_kernel(model):
        assert model.config._attn_implementation == "eager"  # another implementation is left as it is
