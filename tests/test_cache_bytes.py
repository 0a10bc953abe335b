"""linearize.cache_bytes: what a sequence holds in the decode cache, read off the modules."""

import linearize
from linearize.cache_bytes import LayerShape, base_layer_shapes, cache_bytes_per_sequence, layer_shapes
from tests.tiny_models import tiny_model


def test_gemma_layouts_count_sliding_windows_rings_and_kept_heads():
    """Gemma's local layers (window 6) hold 6 keys, its global layer T; linearizing the global layer with one KV
    head kept leaves that head's KV cache beside the ring of the other."""
    base = tiny_model("gemma3_text")
    D = base.config.head_dim
    assert base_layer_shapes(base) == layer_shapes(base) == (
        LayerShape("softmax", 4, 2, D, window=6), LayerShape("softmax", 4, 2, D), LayerShape("softmax", 4, 2, D, window=6))
    T = 50
    kv = lambda t, heads: t * 2 * heads * D * 2  # noqa: E731  (k and v, bf16)
    assert cache_bytes_per_sequence(layer_shapes(base), 2, T) == 2 * kv(6, 2) + kv(T, 2)

    ours = linearize.convert(tiny_model("gemma3_text"), linearize.LinearizeConfig(feature_dim=6, window=4, softmax_heads=[[1, 0]]))
    assert base_layer_shapes(ours) == base_layer_shapes(base)
    hybrid, kept = layer_shapes(ours)[1:3]
    assert kept == LayerShape("softmax", 2, 1, D) and (hybrid.kind, hybrid.H, hybrid.Hkv, hybrid.window) == ("hybrid", 2, 1, 4)
    F, Hf = hybrid.F, hybrid.Hf
    ring = 4 * (2 * D * 2 + Hf * F * 2 + 1) + 4 * Hf * (F * D + 2 * F)
    assert cache_bytes_per_sequence(layer_shapes(ours), 2, T) == 2 * kv(6, 2) + kv(T, 1) + ring
