"""``LinearizedAttention``: a drop-in for an HF decoder layer's softmax attention.

It keeps the base module's ``q_proj/k_proj/v_proj/o_proj`` (and ``q_norm/k_norm``) as the same objects
under the same names, so peft's usual LoRA targets and the checkpoint keys stay what they were; it adds
two feature maps, a per-head window weight and, with ``length_norm``, a per-head length exponent, and with
``sink_tokens``, the per-head query vector and bias of the sink feature.

With ``kept_kv_heads`` (``LinearizeConfig.softmax_heads``) those KV heads and their query heads keep the
base's exact full softmax, and only the other heads are hybrid: the added parameters then cover the hybrid
heads only (``num_hybrid_heads``), and the cache holds a KV cache for the kept heads beside the state.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn as nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..config import LinearizeConfig
from ..ops import HybridState, hybrid_attention_stateful, hybrid_attention_step, use_triton
from ..ops.ring import ring_kernel_serves, ring_step, ring_tail_mask
from ..ops.softmax_decode import softmax_decode_reference
from .cache import DecodeMode, hybrid_cache_layer
from .feature_maps import HedgehogFeatureMap, build_feature_map
from .length_norm import linear_key_counts, scale_phi_q
from .softmax_decode import kernel_serves
from .sink import sink_key_feature, sink_keys, sink_query_feature

#: features the fused kernels take (``linearize.ops.use_triton``, the decode kernel)
MAX_FEATURES = 256

#: kwarg that carries the 2D padding mask [B, past + T] from the model's forward to each layer
PADDING_MASK_KWARG = "linearize_padding_mask"

RopeFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


class LinearizedAttention(nn.Module):
    """Hybrid sliding-window softmax + linear attention with the base layer's projections.

    Modes: ``"hybrid"`` (default) returns the hybrid attention; ``"transfer"`` (attention transfer) also
    computes the base softmax attention, returns *that* as the layer output so the next layer sees the
    teacher's inputs, and keeps ``(hybrid, softmax)`` outputs before ``o_proj`` ([B, T, H*D] each) in
    ``self.transfer_outputs`` for the loss. ``"softmax"`` runs the base attention only.
    """

    MODES = ("hybrid", "transfer", "softmax")

    def __init__(
        self,
        base: nn.Module,
        config: LinearizeConfig,
        *,
        apply_rope: RopeFn,
        rope_rotate_half: bool = False,
        teacher_sliding_window: int | None = None,
        kept_kv_heads: Sequence[int] = (),
    ):
        super().__init__()
        hf = base.config
        if getattr(hf, "attn_logit_softcapping", None) is not None:
            raise ValueError("attention logit soft-capping is not supported by the hybrid attention")
        self.config = hf  # HF attention interfaces read module.config
        self.layer_idx = base.layer_idx
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = base.q_proj, base.k_proj, base.v_proj, base.o_proj
        self.q_norm = getattr(base, "q_norm", None)
        self.k_norm = getattr(base, "k_norm", None)
        self.head_dim = base.head_dim
        self.num_heads = self.q_proj.out_features // self.head_dim
        self.num_kv_heads = self.k_proj.out_features // self.head_dim
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        # (W [Nq + 2 Nkv, hidden], b) while linearize.modules.fused_projections is active: one GEMM for q, k, v
        self.fused_qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.scaling = base.scaling
        self.attention_dropout = getattr(base, "attention_dropout", 0.0)
        self.is_causal = True
        self.sliding_window = teacher_sliding_window
        self._apply_rope = apply_rope
        self.rope_rotate_half = rope_rotate_half  # what the map kernel may apply instead (ArchAdapter.rope_rotate_half)

        G = self.num_key_value_groups
        self.kept_kv_heads = sorted(set(kept_kv_heads))
        if any(not 0 <= h < self.num_kv_heads for h in self.kept_kv_heads):
            raise ValueError(f"kept KV heads {self.kept_kv_heads} out of range: layer {self.layer_idx} has {self.num_kv_heads}")
        hybrid_kv = [h for h in range(self.num_kv_heads) if h not in self.kept_kv_heads]
        if not hybrid_kv:
            raise ValueError(f"layer {self.layer_idx}: every KV head is kept softmax; keep the layer instead (softmax_layers)")
        # head indices of each part ([hybrid], [kept]), whole GQA groups, as Python lists (index tensors are made
        # per device on first use: buffers created under transformers' meta-device init would not be loaded)
        self._head_split = (
            ([h * G + g for h in hybrid_kv for g in range(G)], hybrid_kv),
            ([h * G + g for h in self.kept_kv_heads for g in range(G)], self.kept_kv_heads),
        )
        self._head_index: dict[torch.device, tuple[torch.Tensor, ...]] = {}
        self.num_hybrid_heads, self.num_hybrid_kv_heads = len(hybrid_kv) * G, len(hybrid_kv)
        Hh = self.num_hybrid_heads

        self.window = config.window
        self.feature_rope = config.feature_rope
        self.chunk_size = config.chunk_size
        self.feature_map_q = build_feature_map(config.feature_map, Hh, self.head_dim, config.feature_dim)
        key_heads = self.num_hybrid_kv_heads if config.feature_map_per_kv_head else Hh
        if not self.feature_map_q.has_params:
            key_heads = self.num_hybrid_kv_heads  # nothing per head to learn: share across the GQA group
        self.feature_map_k = build_feature_map(config.feature_map, key_heads, self.head_dim, config.feature_dim)
        self.window_weight_init = config.window_weight_init
        self.window_logit = nn.Parameter(torch.empty(Hh))
        self.length_norm_from = config.length_norm_from
        # alpha [Hh] (hybrid heads) of LinearizeConfig.length_norm; absent when off, so plain checkpoints keep their keys
        self.length_alpha = nn.Parameter(torch.empty(Hh)) if config.length_norm else None
        self.sink_tokens = config.sink_tokens
        # u [Hh, D] and c [Hh] of LinearizeConfig.sink_tokens; absent when off, like length_alpha
        self.sink_u = self.sink_c = None
        if self.sink_tokens:
            F = self.feature_map_q.output_dim
            if F + 1 > MAX_FEATURES:
                raise ValueError(
                    f"sink_tokens adds a feature to the {F} of feature map {config.feature_map!r} (feature_dim "
                    f"{config.feature_dim}): {F + 1} > {MAX_FEATURES}, the most the kernels take; lower feature_dim"
                )
            self.sink_u = nn.Parameter(torch.empty(Hh, self.head_dim))
            self.sink_c = nn.Parameter(torch.empty(Hh))
        self.reset_parameters()
        ref = self.q_proj.weight
        self.to(device=ref.device, dtype=ref.dtype)

        self.mode = "hybrid"
        self.transfer_outputs: tuple[torch.Tensor, torch.Tensor] | None = None

    def reset_parameters(self) -> None:
        """Initialise what conversion added: identity-slice feature maps, gamma = window_weight_init,
        length exponents 0 (no length normalization: the plain recipe) and sink u, c = 0 (each sink key
        starts with weight exp(0) = 1 on top of its ordinary features)."""
        p = self.window_weight_init
        with torch.no_grad():
            self.window_logit.fill_(math.log(p / (1 - p)))
            for param in (self.length_alpha, self.sink_u, self.sink_c):
                if param is not None:
                    param.zero_()
        self.feature_map_q.reset_parameters()
        self.feature_map_k.reset_parameters()

    @property
    def window_weight(self) -> torch.Tensor:
        """gamma [H], in (0, 1)."""
        return torch.sigmoid(self.window_logit.float())

    def extra_repr(self) -> str:
        return (
            f"layer={self.layer_idx}, heads={self.num_heads}/{self.num_kv_heads}, head_dim={self.head_dim}, "
            f"window={self.window}, feature_map={self.feature_map_q.name}, F={self.num_features}"
            + (f", length_norm_from={self.length_norm_from}" if self.length_alpha is not None else "")
            + (f", sink_tokens={self.sink_tokens}" if self.sink_tokens else "")
            + ("" if self.feature_rope else ", feature_rope=False")
            + (f", softmax_kv_heads={self.kept_kv_heads}" if self.kept_kv_heads else "")
        )

    @property
    def num_features(self) -> int:
        """F the ops see: the feature maps' output, plus the sink feature when ``sink_tokens`` is on."""
        return self.feature_map_q.output_dim + (1 if self.sink_tokens else 0)

    @property
    def counts_tokens(self) -> bool:
        """Whether the cache must count each row's valid tokens (``length_norm``'s n_i, the sinks' ranks)."""
        return self.length_alpha is not None or self.sink_tokens > 0

    def qkv(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B,T,H,D], k/v [B,T,Hkv,D], with the base model's q/k norms and RoPE applied."""
        return self.project(hidden_states, position_embeddings)[:3]

    def project(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]):
        """``qkv``'s q, k, v and the q, k the feature maps read: the same tensors, or (``feature_rope``
        off) q and k before RoPE."""
        return self._rotate(*self._projections(hidden_states), position_embeddings)

    def _projections(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B,T,H,D], k/v [B,T,Hkv,D] before RoPE (with the base model's q/k norms)."""
        B, T, _ = hidden_states.shape
        if self.fused_qkv is not None:
            sizes = (self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features)
            q, k, v = (x.view(B, T, -1, self.head_dim)
                       for x in nn.functional.linear(hidden_states, *self.fused_qkv).split(sizes, dim=-1))
        else:
            q = self.q_proj(hidden_states).view(B, T, -1, self.head_dim)
            k = self.k_proj(hidden_states).view(B, T, -1, self.head_dim)
            v = self.v_proj(hidden_states).view(B, T, -1, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return q, k, v

    def _rotate(self, q, k, v, position_embeddings):
        """The model's RoPE on q and k: (q, k, v, fq, fk), fq and fk what the feature maps read."""
        fq, fk = q, k
        cos, sin = position_embeddings
        q, k = self._apply_rope(q, k, cos, sin, unsqueeze_dim=2)
        if self.feature_rope:
            fq, fk = q, k
        return q, k, v, fq, fk

    def softmax_attention(self, q, k, v, attention_mask, **kwargs) -> torch.Tensor:
        """The base layer's own attention (through transformers' attention interface) -> [B,T,H,D]."""
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, _eager_attention)
        out, _ = interface(
            self,
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        return out

    def hybrid_attention(self, q, k, v, fq, fk, key_mask, cache, phis=None) -> torch.Tensor:
        """[B,T,H,D] through the hybrid attention, continuing and updating ``cache`` if given. ``fq``,
        ``fk``: what the feature maps read (``project``); or ``phis``, the maps' outputs (RoPE fused with them)."""
        B, T = q.shape[:2]
        phi_q, phi_k = phis if phis is not None else self._feature_maps(fq, fk)
        # gamma is computed where it is used: the ring kernel takes the logits (its sigmoid inside the launch)
        args = dict(window=self.window, scale=self.scaling, attention_mask=key_mask)
        # what the cache counts (valid tokens) only when length normalization or the sinks need it
        valid = None
        if self.counts_tokens:
            valid = key_mask if key_mask is not None else torch.ones(B, T, dtype=torch.bool, device=q.device)
        if cache is None:
            phi_q, phi_k = self._features(q, phi_q, phi_k, valid, None, None)
            y, _ = hybrid_attention_stateful(q, k, v, phi_q, phi_k, chunk_size=self.chunk_size,
                                             window_weight=self.window_weight, **args)
            return y
        layer = hybrid_cache_layer(cache, self.layer_idx, self.window)
        if valid is not None and layer.has_state and layer.valid_count is None:
            raise RuntimeError(
                f"layer {self.layer_idx} of the cache was filled without the token counts that length_norm and "
                "sink_tokens need; use a fresh cache"
            )
        seen = layer.valid_count  # None on a fresh layer
        if layer.has_state and T == 1:
            if self._decode_in_place(layer, q, k, v, phi_q, phi_k, self.window_logit):
                # the Triton kernel updates the layer's ring state in place (no new tensors, no host sync)
                ring = layer.ring_state()
                tail = ring_tail_mask(ring) if self.length_alpha is not None else None
                phi_q, phi_k = self._features(q, phi_q, phi_k, valid, seen, tail)
                y = ring_step(q, k, v, phi_q, phi_k, ring, window_logit=self.window_logit, scale=self.scaling,
                              attention_mask=key_mask, kernel=DecodeMode.kernel, advance=not DecodeMode.count_outside)
                layer.advance(T, valid)
                return y
            state = layer.hybrid_state()
            phi_q, phi_k = self._features(q, phi_q, phi_k, valid, seen, state.mask)
            y, state = hybrid_attention_step(q, k, v, phi_q, phi_k, state, window_weight=self.window_weight, **args)
        else:
            state = layer.hybrid_state()
            phi_q, phi_k = self._features(q, phi_q, phi_k, valid, seen, state.mask if state is not None else None)
            y, state = hybrid_attention_stateful(
                q, k, v, phi_q, phi_k, chunk_size=self.chunk_size, initial_state=state, output_final_state=True,
                window_weight=self.window_weight, **args
            )
        layer.update_state(_detached(state), T, valid)
        return y

    def _features(self, q, phi_q, phi_k, valid, seen, tail) -> tuple[torch.Tensor, torch.Tensor]:
        """phi_q [B,T,H,F'], phi_k [B,T,H',F'] as the ops take them: phi_q scaled for ``length_norm``, then
        (``sink_tokens``) the sink feature appended to both (F' = F + 1). ``valid`` [B,T] (None when neither
        is on), ``seen`` [B] and ``tail`` [B,L] continue a cached sequence (see ``linear_key_counts``)."""
        if self.length_alpha is not None:
            counts = linear_key_counts(valid, self.window, seen, tail)
            phi_q = scale_phi_q(phi_q, counts, self.length_alpha, self.length_norm_from)
        if self.sink_tokens:
            is_sink = sink_keys(valid, self.sink_tokens, seen)
            phi_q = torch.cat([phi_q, sink_query_feature(q, self.sink_u, self.sink_c, phi_q.dtype)], -1)
            phi_k = torch.cat([phi_k, sink_key_feature(is_sink, phi_k.shape[2], phi_k.dtype)], -1)
        return phi_q, phi_k

    @property
    def maps_fusable(self) -> bool:
        """Whether a decode step may compute this layer's feature maps with the Triton map kernel
        (``linearize.ops.triton.feature_maps``): both are Hedgehog maps. length_norm and the sinks act on
        the maps' output, so they do not matter here."""
        return all(isinstance(m, HedgehogFeatureMap) for m in (self.feature_map_q, self.feature_map_k))

    def _feature_maps(self, fq, fk) -> tuple[torch.Tensor, torch.Tensor]:
        """phi_q [B,T,H,F], phi_k [B,T,H',F]: one Triton launch for both maps (forward and backward,
        ``linearize.ops.triton.feature_maps``) where it serves (``maps_fusable``, the fused kernels on, f <= 128,
        ``HedgehogFeatureMap.kernel``), else the maps' modules. A compiled decode step uses it only under
        ``DecodeMode.fuse_maps`` with the kernels on (``CompiledDecode(fuse_maps=...)``)."""
        wq, wk = getattr(self.feature_map_q, "weight", None), getattr(self.feature_map_k, "weight", None)
        if (self.maps_fusable and HedgehogFeatureMap.kernel and (not DecodeMode.ring or (DecodeMode.fuse_maps and DecodeMode.kernel))
                and use_triton(fq, fq) and fk.dtype == fq.dtype and wq.shape[-1] <= 128):
            from ..ops.triton.feature_maps import hedgehog_pair_triton

            return hedgehog_pair_triton(fq, fk, wq, wk)
        return self.feature_map_q(fq), self.feature_map_k(fk)

    @property
    def rope_fusable(self) -> bool:
        """Whether a decode step may apply this layer's RoPE inside the map kernel (``rope_hedgehog_pair_triton``):
        Hedgehog maps, transformers' rotate-half RoPE, every head hybrid."""
        return self.maps_fusable and self.rope_rotate_half and not self.kept_kv_heads

    def _rope_fused(self, q: torch.Tensor, k: torch.Tensor, position_embeddings, cache) -> bool:
        """Whether this decode step applies RoPE inside the map kernel (``DecodeMode.fuse_rope``, which a compiled
        step sets): q, k [B,1,H,D] before RoPE, through a cache, no gradient, RoPE in the rotate-half form over the
        whole head dim, every head hybrid, and the map kernel serving these maps (as ``_feature_maps`` decides)."""
        if not (DecodeMode.ring and DecodeMode.fuse_rope and DecodeMode.kernel and self.rope_fusable):
            return False
        if q.shape[1] != 1 or cache is None or self.mode != "hybrid" or torch.is_grad_enabled():
            return False
        cos = position_embeddings[0]
        return (HedgehogFeatureMap.kernel and use_triton(q, q) and k.dtype == q.dtype
                and self.head_dim % 2 == 0 and cos.dim() == 3 and cos.shape[-1] == self.head_dim
                and self.feature_map_q.weight.shape[-1] <= 128)

    def _decode_in_place(self, layer, q, k, v, phi_q, phi_k, window_logit) -> bool:
        """Decode on the ring state with the Triton kernel: on CUDA when it serves these inputs, and when
        no gradient is wanted (the kernel has no backward; training through a cache keeps the step).
        phi_q, phi_k are the maps' features before ``_features``; the kernel takes F + 1 as well (checked
        at construction), and the dtypes do not change."""
        added = tuple(p for p in (self.length_alpha, self.sink_u, self.sink_c) if p is not None)
        wanted = (q, k, v, phi_q, phi_k, window_logit) + added
        if torch.is_grad_enabled() and any(t.requires_grad for t in wanted):
            return False
        if DecodeMode.ring:  # a compiled step (linearize.decode): the ring, with or without the kernel
            return True
        return ring_kernel_serves(q, k, v, phi_q, phi_k, layer.held)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        # transformers >= 5.24 hands the cache to attention layers as ``cache`` (``past_key_values`` before)
        cache = cache if cache is not None else past_key_values
        padding_mask = kwargs.pop(PADDING_MASK_KWARG, None)
        for unused in ("position_ids", "use_cache", "cache_position", "output_attentions"):
            kwargs.pop(unused, None)
        B, T, _ = hidden_states.shape
        q, k, v = self._projections(hidden_states)
        phis = None
        if self._rope_fused(q, k, position_embeddings, cache):  # RoPE and both maps in one launch
            from ..ops.triton.feature_maps import rope_hedgehog_pair_triton

            q, k, *phis = rope_hedgehog_pair_triton(q, k, *position_embeddings, self.feature_map_q.weight,
                                                    self.feature_map_k.weight, feature_rope=self.feature_rope)
            fq = fk = None
        else:
            q, k, v, fq, fk = self._rotate(q, k, v, position_embeddings)

        if self.mode == "softmax":
            if cache is not None:
                raise RuntimeError("softmax mode of a linearized layer cannot use a cache; pass use_cache=False")
            y = self.softmax_attention(q, k, v, attention_mask, **kwargs)
        else:
            key_mask = _new_token_mask(padding_mask, B, T)
            # the hybrid heads' part (all heads unless some are kept softmax)
            part = (q, k, v, fq, fk)
            if self.kept_kv_heads:
                hq, hkv, sq, skv, order = self._split_index(q.device)
                part = (q.index_select(2, hq), k.index_select(2, hkv), v.index_select(2, hkv), fq.index_select(2, hq),
                        fk.index_select(2, hkv))
            if self.mode == "transfer":
                if cache is not None and cache.get_seq_length(self.layer_idx) > 0:
                    raise RuntimeError("attention transfer runs on whole sequences; pass use_cache=False")
                y_hybrid = self.hybrid_attention(*part, key_mask, None)
                y = self.softmax_attention(q, k, v, attention_mask, **kwargs)
                if self.kept_kv_heads:  # the kept heads are the teacher's own: nothing to learn there
                    y_hybrid = torch.cat([y_hybrid, y.index_select(2, sq)], 2).index_select(2, order)
                self.transfer_outputs = (y_hybrid.reshape(B, T, -1), y.reshape(B, T, -1))
            else:
                y = self.hybrid_attention(*part, key_mask, cache, phis)
                if self.kept_kv_heads:
                    qs, ks, vs = q.index_select(2, sq), k.index_select(2, skv), v.index_select(2, skv)
                    if cache is None:
                        y_kept = self.softmax_attention(qs, ks, vs, attention_mask, **kwargs)
                    else:
                        ks, vs, valid = hybrid_cache_layer(cache, self.layer_idx, self.window).append_kept(ks, vs, key_mask)
                        y_kept = self._kept_attention(qs, ks, vs, valid)
                    y = torch.cat([y, y_kept], 2).index_select(2, order)  # [hybrid, kept] heads back in place
        return self.o_proj(y.reshape(B, T, -1)), None

    def _split_index(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(hybrid q heads, hybrid KV heads, kept q heads, kept KV heads, the order that puts [hybrid, kept]
        query heads back in place) as index tensors on ``device``; made once per device (not in a step)."""
        idx = self._head_index.get(device)
        if idx is None:
            (hq, hkv), (sq, skv) = self._head_split
            order = sorted(range(self.num_heads), key=(hq + sq).__getitem__)
            idx = self._head_index[device] = tuple(torch.tensor(x, dtype=torch.long, device=device) for x in (hq, hkv, sq, skv, order))
        return idx

    def _kept_attention(self, q, k, v, valid) -> torch.Tensor:
        """Exact causal softmax of the kept heads over their cache: q [B,T,Hs,D] (the last T of the L keys),
        k, v [B,Hks,L,D], ``valid`` [B, L] (a written, valid key) -> [B,T,Hs,D]. One token reads the cache
        through ``linearize.ops.softmax_decode`` (the Triton split-K kernel where it serves: GQA without a
        copy, only the valid slots read), a prefill through SDPA."""
        T, L = q.shape[1], k.shape[2]
        if T == 1:
            qh = q.transpose(1, 2)
            if DecodeMode.kernel and kernel_serves(qh, k, None, 0.0, {}):  # (the kept softmax layers' test)
                from ..ops.triton.softmax_decode import softmax_decode_triton

                return softmax_decode_triton(qh, k, v, valid, scale=self.scaling)
            return softmax_decode_reference(qh, k, v, valid, scale=self.scaling)
        i = torch.arange(L - T, L, device=q.device)
        j = torch.arange(L, device=q.device)
        # a padding query keeps its own key: a row with no key at all would be NaN
        mask = ((j[None, :] <= i[:, None]) & valid[:, None, :]) | (j[None, :] == i[:, None])
        y = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k, v, attn_mask=mask[:, None], scale=self.scaling, enable_gqa=self.num_key_value_groups > 1)
        return y.transpose(1, 2)

def _new_token_mask(padding_mask: torch.Tensor | None, B: int, T: int) -> torch.Tensor | None:
    """Validity [B, T] of this call's tokens from a 2D mask over [past + new] tokens."""
    if padding_mask is None or padding_mask.dim() != 2:
        return None
    if padding_mask.shape[0] != B or padding_mask.shape[1] < T:
        raise ValueError(f"attention_mask of shape {tuple(padding_mask.shape)} does not cover {T} new tokens of batch {B}")
    m = padding_mask[:, -T:].bool()
    if T == 1:
        # decode: keep the mask rather than test it on the host; the test is a device sync in every layer
        # of every step (and forbids capturing the step in a CUDA graph), and an all-True mask gives the
        # same result as None
        return m
    return None if bool(m.all()) else m


def _detached(state: HybridState) -> HybridState:
    """The cache keeps values, not graphs: generation must not grow an autograd tape across steps."""
    return HybridState(*(t.detach() for t in state))


def _eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Fallback softmax attention, used when no attention implementation is registered ([B,H,T,D] in)."""
    G = module.num_key_value_groups
    key = key.repeat_interleave(G, dim=1)
    value = value.repeat_interleave(G, dim=1)
    w = (query @ key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        w = w + attention_mask
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    return (w @ value).transpose(1, 2).contiguous(), w
