"""The per-layer cache of a linearized layer, as a layer of transformers' own ``Cache``.

transformers' ``hybrid_sliding`` layer type (a recurrent state plus a sliding KV window) is the shape of
our state, so the layer subclasses it and lives inside the ``DynamicCache`` that ``generate`` builds.
The model's config still lists the original layer types (they pick the attention masks of the layers
kept as softmax), so a linearized attention swaps its slot's fresh layer for this one on first use.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, LinearAttentionAndSlidingWindowAttentionLayer

from ..ops import HybridState


class HybridCacheLayer(LinearAttentionAndSlidingWindowAttentionLayer):
    """Holds one layer's ``HybridState``: sums S, z (recurrent states 0 and 1) and the window tail.

    ``keys``/``values`` mirror the tail ([B, L, Hkv, D], L <= window - 1) for introspection. The cache is
    not croppable: a recurrent sum cannot give a token back.
    """

    # Not a sliding layer for mask purposes: the masks sized from sliding layers belong to the softmax
    # layers the model kept (Gemma 3's local layers); ours read padding from the 2D mask instead.
    is_sliding = False

    def __init__(self, window: int):
        super().__init__(sliding_window=max(window, 1), number_of_states=2)
        self.window = window
        self.state: HybridState | None = None
        self.cumulative_length = 0

    # -- the interface our attention uses ------------------------------------------------------------
    def update_state(self, state: HybridState, num_new_tokens: int) -> None:
        self.state = state
        self.cumulative_length += num_new_tokens
        self._mirror()

    def _mirror(self, track_device: bool = True) -> None:
        """Expose the state through the attributes transformers' generic code reads."""
        st = self.state
        initialized = st is not None
        self.keys, self.values = (st.k, st.v) if initialized else (None, None)
        self.recurrent_states[0], self.recurrent_states[1] = (st.S, st.z) if initialized else (None, None)
        for i in (0, 1):
            self.is_recurrent_states_initialized[i] = initialized
            self.has_previous_state[i] = initialized
        self.is_initialized = initialized
        if initialized and track_device:
            self.device, self.dtype = st.k.device, st.k.dtype

    # -- CacheLayerMixin ----------------------------------------------------------------------------
    def lazy_initialization(self, *args, **kwargs) -> None:
        """State is created by the first prefill; nothing to allocate ahead."""

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("a linearized layer's cache holds a recurrent state, not a KV cache; use update_state")

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Sized like a full-attention layer, so a mask built from this slot fits the softmax layers.
        return self.cumulative_length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    @property
    def is_croppable(self) -> bool:
        return self.state is None

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0 and self.state is not None:
            raise RuntimeError("cannot crop a linearized layer's cache: its recurrent sums cannot drop tokens")

    def reset(self) -> None:
        self.state = None
        self.cumulative_length = 0
        self._mirror()

    def _index(self, index: torch.Tensor) -> None:
        if self.state is not None:
            self.state = self.state.index_batch(index)
            self._mirror()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._index(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if indices.dtype == torch.bool:
            indices = indices.nonzero().flatten()
        self._index(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            B = self.state.S.shape[0]
            self._index(torch.arange(B, device=self.state.S.device).repeat_interleave(repeats))

    def offload(self) -> None:
        if self.state is not None:
            self.state = self.state.to("cpu")
            self._mirror(track_device=False)

    def prefetch(self) -> None:
        if self.state is not None and self.device is not None and self.state.k.device != self.device:
            self.state = self.state.to(self.device)
            self._mirror()

    def __repr__(self) -> str:
        return f"HybridCacheLayer(window={self.window}, seen={self.cumulative_length})"


def hybrid_cache_layer(cache: Cache, layer_idx: int, window: int) -> HybridCacheLayer:
    """The ``HybridCacheLayer`` at ``layer_idx`` of ``cache``, installing it if the slot is fresh."""
    layers = cache.layers
    if layer_idx >= len(layers):
        if cache.layer_class_to_replicate is None:
            raise ValueError(f"the cache has {len(layers)} layers; layer {layer_idx} has no slot")
        while len(layers) <= layer_idx:
            layers.append(cache.layer_class_to_replicate())
    layer = layers[layer_idx]
    if isinstance(layer, HybridCacheLayer):
        return layer
    if getattr(layer, "is_initialized", False) and layer.get_seq_length() > 0:
        raise ValueError(
            f"layer {layer_idx} of the cache already holds softmax keys/values; a linearized layer needs a fresh cache"
        )
    layers[layer_idx] = HybridCacheLayer(window)
    return layers[layer_idx]
