"""``LinearizeConfig``: what to convert and how. Plain dataclass; checked on construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LinearizeConfig:
    """Settings of the hybrid attention that replaces softmax attention.

    window: recent keys (the query's own included) that get exact softmax; 0 = pure linear attention.
    feature_map: ``hedgehog`` (LoLCATs), ``t2r``, ``elu`` or ``taylor``.
    feature_dim: f, the per-head projection width of the map (hedgehog gives F = 2f features).
    window_weight_init: gamma at initialisation, a per-head sigmoid-parameterised weight on the window.
    feature_map_per_kv_head: one key map per KV head (state [B, Hkv, F, D]) instead of per query head
        (LoLCATs' choice, state [B, H, F, D]); GQA models then keep a state G times smaller.
    layers: indices of the layers to convert; None = every eligible layer.
    softmax_layers: indices of layers to keep as softmax attention (applied after ``layers``).
    softmax_heads: [layer, kv_head] pairs whose KV head (with its query heads) keeps exact full softmax
        attention inside a converted layer, beside the hybrid on the layer's other heads. Retrieval sits in
        a few heads (``linearize retrieval-layers --heads``: Qwen2.5-0.5B's top 3 KV heads of 48 carry
        passkey, where whole layers need 4 layers, 8 KV heads), and a kept head costs a KV cache of its own,
        so keeping heads instead of layers keeps the cache small. A layer listed with every KV head is kept
        whole, as in ``softmax_layers``.
    convert_sliding_layers: also convert layers whose softmax is already sliding-window (Gemma 3's
        local layers, Qwen's optional sliding layers). Off by default: those layers already decode with a
        bounded KV cache, and their teacher never looks past its window.
    chunk_size: query chunk of the PyTorch path (memory O(T * (window + chunk))).
    length_norm: learn a per-head power-law decay of the linear part with the number of keys it sums.
        The linear part sums phi_q . phi_k over every valid key older than the window, so its share of
        the shared normalizer grows ~linearly with that count n, while softmax mass on distant keys grows
        sub-linearly (RoPE's long-range decay): trained at one length, the window/linear balance drifts at
        another. On, phi_q of query i is scaled by (L0 / max(n_i, L0)) ** alpha_h, alpha_h a learned
        ``length_alpha`` [H] that starts at 0 (the plain recipe), so the linear mass grows like
        n^(1 - alpha) past L0.
    length_norm_from: L0 of ``length_norm``, the key count below which the linear part is not rescaled.
    sink_tokens: S, the number of leading valid tokens of each sequence treated as attention sinks; 0 =
        off. Softmax puts a large, length-independent share of its mass on the first tokens; once they
        leave the window the linear part's bounded features cannot give them that weight, and the ~n
        mass of the other old keys dilutes them as n grows. On, one feature is appended to phi_q and
        phi_k (F -> F + 1, at most 256): 1 on the first S valid keys (0 elsewhere) and
        exp(q_i . u_h + c_h) on queries (post-RoPE q, exponent capped at 30), u [H, D] and c [H] learned
        (``sink_u``, ``sink_c``, both 0 at first). ``length_norm`` does not scale this feature. The
        Triton kernels pad F + 1 = 129 (hedgehog, f = 64) to 256-wide feature tiles: a cost.
    feature_rope: the feature maps read q and k after RoPE (true: LoLCATs) or before it (false). After
        RoPE, phi sees each token's absolute rotation, and past the training length the slow RoPE
        frequencies reach angles the maps were never trained on (the H200 run of 2026-12-03, trained at
        1024: 1.17x the base's perplexity at 512, 4.96x at 2K, 51x at 4K). Before RoPE, the linear part
        is position-free, as the window's exact softmax keeps the positions of the recent keys.
    """

    window: int = 64
    feature_map: str = "hedgehog"
    feature_dim: int = 64
    window_weight_init: float = 0.1
    feature_map_per_kv_head: bool = False
    layers: list[int] | None = None
    softmax_layers: list[int] = field(default_factory=list)
    softmax_heads: list[list[int]] = field(default_factory=list)
    convert_sliding_layers: bool = False
    chunk_size: int = 64
    length_norm: bool = False
    length_norm_from: int = 256
    sink_tokens: int = 0
    feature_rope: bool = True

    def __post_init__(self) -> None:
        from .modules.feature_maps import FEATURE_MAPS

        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"invalid LinearizeConfig.{name}={getattr(self, name)!r}: {why}")

        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 0:
            raise bad("window", "must be an int >= 0")
        if self.feature_map not in FEATURE_MAPS:
            raise bad("feature_map", f"choose one of {sorted(FEATURE_MAPS)}")
        if not isinstance(self.feature_dim, int) or self.feature_dim < 1:
            raise bad("feature_dim", "must be an int >= 1")
        if not 0.0 < float(self.window_weight_init) < 1.0:
            raise bad("window_weight_init", "must be in (0, 1) (it is a sigmoid)")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise bad("chunk_size", "must be an int >= 1")
        if not isinstance(self.length_norm, bool):
            raise bad("length_norm", "must be true or false")
        if not isinstance(self.length_norm_from, int) or isinstance(self.length_norm_from, bool) or self.length_norm_from < 1:
            raise bad("length_norm_from", "must be an int >= 1")
        if not isinstance(self.sink_tokens, int) or isinstance(self.sink_tokens, bool) or self.sink_tokens < 0:
            raise bad("sink_tokens", "must be an int >= 0")
        if not isinstance(self.feature_rope, bool):
            raise bad("feature_rope", "must be true or false")
        for name in ("layers", "softmax_layers"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (list, tuple)) or not all(isinstance(i, int) and i >= 0 for i in value)):
                raise bad(name, "must be a list of layer indices >= 0")
        pairs = self.softmax_heads
        if not isinstance(pairs, (list, tuple)) or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in p)
            for p in pairs
        ):
            raise bad("softmax_heads", "must be a list of [layer, kv_head] pairs of ints >= 0, e.g. [[16, 0], [9, 1]]")
        if self.layers is not None:
            self.layers = list(self.layers)
        self.softmax_layers = list(self.softmax_layers)
        self.softmax_heads = [list(p) for p in sorted({tuple(p) for p in pairs})]

    def kept_heads(self, layer: int) -> list[int]:
        """The KV heads of ``layer`` that ``softmax_heads`` keeps softmax (sorted)."""
        return [h for i, h in self.softmax_heads if i == layer]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LinearizeConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LinearizeConfig key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**data)
