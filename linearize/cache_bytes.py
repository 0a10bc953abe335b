"""What a sequence holds in the decode cache, from a model's attention modules (linearized or not).

A softmax layer holds its keys and values: ``T * 2 * Hkv * D * e`` bytes at T tokens (``min(T, window)`` on a
sliding layer; ``e`` = bytes of the cache dtype). A hybrid layer holds what its decode ring holds, whatever T:
the fp32 sums S [H', F, D] and z (double-buffered, 2 x [H', F]), and W = window slots of k, v (``2 * Hkv * D * e``
each), of the keys' features (``H' * F * e``) and a mask byte. Heads kept softmax inside a hybrid layer
(``LinearizeConfig.softmax_heads``) hold their own keys and values, as a softmax layer of those heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

FP32 = 4


@dataclass(frozen=True)
class LayerShape:
    """One decoder layer's attention: ``hybrid`` (linearized) or ``softmax`` (a KV cache)."""

    kind: str
    H: int
    Hkv: int
    D: int
    Hf: int = 0  # key feature heads H' (hybrid)
    F: int = 0  # features per head (hybrid)
    window: int = 0  # hybrid: softmax window; softmax: sliding window (0 = full attention)


def _heads(attn: nn.Module) -> tuple[int, int, int]:
    D = attn.head_dim
    return attn.q_proj.out_features // D, attn.k_proj.out_features // D, D


def layer_shapes(model: nn.Module) -> tuple[LayerShape, ...]:
    """The attention of each decoder layer of an HF causal LM as it decodes: a hybrid layer with kept softmax
    heads gives two entries (its hybrid heads, then its kept heads)."""
    from .modules.attention import LinearizedAttention

    out = []
    for layer in model.base_model.layers:
        a = layer.self_attn
        H, Hkv, D = _heads(a)
        if isinstance(a, LinearizedAttention):
            Hh, Hkh = a.num_hybrid_heads, a.num_hybrid_kv_heads
            out.append(LayerShape("hybrid", Hh, Hkh, D, a.feature_map_k.num_heads, a.num_features, a.window))
            if Hh < H:
                out.append(LayerShape("softmax", H - Hh, Hkv - Hkh, D))
        else:
            out.append(LayerShape("softmax", H, Hkv, D, window=int(getattr(a, "sliding_window", None) or 0)))
    return tuple(out)


def base_layer_shapes(model: nn.Module) -> tuple[LayerShape, ...]:
    """``layer_shapes`` of the model before linearization: every layer softmax, over all its heads (a linearized
    layer's ``sliding_window`` is the base's, kept on the module)."""
    return tuple(LayerShape("softmax", *_heads(layer.self_attn), window=int(getattr(layer.self_attn, "sliding_window", None) or 0))
                 for layer in model.base_model.layers)


def hybrid_bytes_per_sequence(L: LayerShape, elem: int) -> dict[str, int]:
    """Bytes a sequence holds in hybrid layer ``L``: the fp32 sums S and double-buffered z (``sums``), the ring's
    W slots of k and v (``kv``), and its feature-mapped keys phi_k with the mask byte (``phi``)."""
    W = L.window if L.window >= 2 else 0
    return {"sums": FP32 * L.Hf * (L.F * L.D + 2 * L.F), "kv": W * 2 * L.Hkv * L.D * elem, "phi": W * (L.Hf * L.F * elem + 1)}


def cache_bytes_per_sequence(layers: tuple[LayerShape, ...], elem: int, total_len: int) -> int:
    """Bytes a sequence holds in the cache at ``total_len`` tokens (module docstring), caches in ``elem``-byte dtype."""
    n = 0
    for L in layers:
        if L.kind == "softmax":
            t = min(total_len, L.window) if L.window else total_len
            n += t * 2 * L.Hkv * L.D * elem
        else:
            n += sum(hybrid_bytes_per_sequence(L, elem).values())
    return n
