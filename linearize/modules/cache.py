"""The per-layer cache of a linearized layer, as a layer of transformers' own ``Cache``.

transformers' ``hybrid_sliding`` layer type (a recurrent state plus a sliding KV window) is the shape of
our state, so the layer subclasses it and lives inside the ``DynamicCache`` that ``generate`` builds.
The model's config still lists the original layer types (they pick the attention masks of the layers
kept as softmax), so a linearized attention swaps its slot's fresh layer for this one on first use.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, LinearAttentionAndSlidingWindowAttentionLayer, StaticLayer, StaticSlidingWindowLayer

from ..ops import HybridState
from ..ops.ring import RingState, ring_from_state, ring_to_state


class DecodeMode:
    """Set by ``linearize.decode.CompiledDecode`` around its compiled step (read while tracing; dynamo
    guards on these values, which stay fixed across steps):

    * ``ring``: decode steps run on the in-place ring state even where the Triton kernel does not serve
      (``ring_step_torch``, which inductor then fuses): shapes and buffers never change between steps;
    * ``kernel``: whether the ring step may use the Triton decode kernel (False: the PyTorch step);
    * ``count_outside``: ``advance`` leaves ``cumulative_length`` to the caller. A Python int counted in
      traced code is guarded on, and the compiled step would recompile at every token. The ring steps leave
      their ``pos`` to the caller too, which advances every layer's at once (one launch instead of one a layer);
    * ``fuse_maps``: Hedgehog layers compute both feature maps of a decode step in one Triton launch
      (``linearize.ops.triton.feature_maps``) instead of the modules' six kernels;
    * ``fuse_rope`` (with ``fuse_maps``): that launch also applies RoPE to q and k
      (``rope_hedgehog_pair_triton``), where the architecture's RoPE is transformers' rotate-half form.
    """

    ring = False
    kernel = True
    count_outside = False
    fuse_maps = False
    fuse_rope = False


class HybridCacheLayer(LinearAttentionAndSlidingWindowAttentionLayer):
    """Holds one layer's state: sums S, z (recurrent states 0 and 1) and the window tail.

    The state is kept in one of two forms: a ``HybridState`` (ordered tail; what prefill produces and
    consumes) or, while decoding on the Triton kernel, a ``RingState`` updated in place. ``hybrid_state()``
    and ``ring_state()`` convert on demand (ring -> ordered reads the ring position: one host sync, only
    when decode hands back to a prefill). ``keys``/``values`` mirror the tail for introspection: the
    ordered tail [B, L, Hkv, D] (L <= window - 1), or the ring [B, window, Hkv, D] in slot order. The
    cache is not croppable: a recurrent sum cannot give a token back.

    ``kept_k``, ``kept_v`` [B, Hs, capacity, D] are the KV cache of the heads the layer keeps softmax
    (``LinearizeConfig.softmax_heads``; None without them), in the layout of transformers' attention functions
    and of ``linearize.ops.softmax_decode``. ``kept_valid`` [B, capacity] marks the slots written with a valid
    token, which is all a one-token step needs to know of the fill (no host value: capturable); ``kept_pos``
    [1] (device) counts the slots written, ``kept_filled`` its host mirror (eager only: ``CompiledDecode``
    advances it outside the step, as ``cumulative_length``). The capacity doubles as needed, eagerly, or is
    set once by ``reserve_kept`` (``linearize.decode.reserve_kept_heads``) so that a compiled step never grows it.

    ``valid_count`` [B] (int64, on the state's device) counts each row's valid (non-padding) tokens so
    far, for ``LinearizeConfig.length_norm``; None when the attention does not ask for it. It is kept
    apart from the state, so it is the same whichever form the state is in, and a ring step updates it in
    place (no host sync, CUDA-graph capturable).
    """

    # Not a sliding layer for mask purposes: the masks sized from sliding layers belong to the softmax
    # layers the model kept (Gemma 3's local layers); ours read padding from the 2D mask instead.
    is_sliding = False

    def __init__(self, window: int):
        super().__init__(sliding_window=max(window, 1), number_of_states=2)
        self.window = window
        self._state: HybridState | None = None
        self._ring: RingState | None = None
        self.valid_count: torch.Tensor | None = None
        self.kept_k: torch.Tensor | None = None
        self.kept_v: torch.Tensor | None = None
        self.kept_valid: torch.Tensor | None = None
        self.kept_pos: torch.Tensor | None = None
        self.kept_filled = 0
        self.kept_capacity = 0  # the least capacity to allocate (reserve_kept)
        self.static_len = 0  # the static cache's length when this layer took a static layer's slot
        self.cumulative_length = 0

    # -- the interface our attention uses ------------------------------------------------------------
    @property
    def has_state(self) -> bool:
        return self._state is not None or self._ring is not None

    @property
    def held(self) -> HybridState | RingState | None:
        """The state in the form it is held now (no conversion)."""
        return self._ring if self._ring is not None else self._state

    @property
    def state(self) -> HybridState | None:
        """The state as a ``HybridState`` (a converted copy while it is held as a ring)."""
        return ring_to_state(self._ring) if self._ring is not None else self._state

    def hybrid_state(self) -> HybridState | None:
        """The state in ordered form, converting a ring (which the layer then drops)."""
        if self._ring is not None:
            self._state, self._ring = ring_to_state(self._ring), None
            self._mirror()
        return self._state

    def ring_state(self) -> RingState:
        """The state in ring form for in-place decode steps, converting the ordered state on first use."""
        if self._ring is None:
            if self._state is None:
                raise RuntimeError("the ring form needs a state: run a prefill first")
            self._ring, self._state = ring_from_state(self._state, self.window), None
            self._mirror()
        return self._ring

    def update_state(self, state: HybridState, num_new_tokens: int, valid: torch.Tensor | None = None) -> None:
        """Hold ``state`` after ``num_new_tokens`` more tokens; ``valid`` [B, T] (bool) also counts the
        valid ones into ``valid_count``."""
        self._state, self._ring = state, None
        self.cumulative_length += num_new_tokens
        if valid is not None:
            new = valid.long().sum(1)
            self.valid_count = new if self.valid_count is None else self.valid_count + new
        self._mirror()

    def reserve_kept(self, capacity: int) -> None:
        """Hold at least ``capacity`` tokens of the kept heads' KV cache from now on (allocated now if it exists)."""
        self.kept_capacity = max(self.kept_capacity, capacity)
        if self.kept_k is not None and self.kept_k.shape[2] < capacity:
            self._grow_kept(capacity)

    def make_room_kept(self, n: int) -> None:
        """Room for ``n`` tokens of the kept heads, doubling the buffers if they are short (a new shape: a compiled
        step recompiles, which ``reserve_kept`` avoids)."""
        if n > self.kept_k.shape[2]:
            self._grow_kept(max(2 * self.kept_k.shape[2], n))

    def _grow_kept(self, capacity: int) -> None:
        k, v, valid = self.kept_k, self.kept_v, self.kept_valid
        B, Hs, n, D = k.shape
        self.kept_k, self.kept_v = k.new_zeros(B, Hs, capacity, D), v.new_zeros(B, Hs, capacity, D)
        self.kept_valid = valid.new_zeros(B, capacity)
        self.kept_k[:, :, :n], self.kept_v[:, :, :n], self.kept_valid[:, :n] = k, v, valid

    def append_kept(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """Write the kept heads' new keys and values [B, T, Hs, D] (``valid`` [B, T] bool, None: all valid).
        Returns (keys, values [B, Hs, L, D], valid [B, L]): for T = 1 the whole buffers (L = capacity; unwritten
        slots not valid), for a prefill (T > 1) the L = written slots so far."""
        B, T, Hs, D = k.shape
        if self.kept_k is None:
            cap = max(self.kept_capacity, T, 64)
            self.kept_k, self.kept_v = k.new_zeros(B, Hs, cap, D), v.new_zeros(B, Hs, cap, D)
            self.kept_valid = torch.zeros(B, cap, dtype=torch.bool, device=k.device)
            self.kept_pos = torch.zeros(1, dtype=torch.long, device=k.device)
        counted = not DecodeMode.count_outside
        if counted:  # eager (CompiledDecode makes the room before its step)
            self.make_room_kept(self.kept_filled + T)
        ok = torch.ones(B, T, dtype=torch.bool, device=k.device) if valid is None else valid.bool()
        kt, vt = k.detach().transpose(1, 2).to(self.kept_k.dtype), v.detach().transpose(1, 2).to(self.kept_v.dtype)
        if T == 1:  # at the device's count: no host value, so a compiled step neither recompiles nor syncs
            self.kept_k.index_copy_(2, self.kept_pos, kt)
            self.kept_v.index_copy_(2, self.kept_pos, vt)
            self.kept_valid.index_copy_(1, self.kept_pos, ok)
            self.kept_pos.add_(1)
            if counted:
                self.kept_filled += 1
            return self.kept_k, self.kept_v, self.kept_valid
        if not counted:
            raise RuntimeError("a compiled decode step takes one token; prefill eagerly")
        a, b = self.kept_filled, self.kept_filled + T
        self.kept_k[:, :, a:b], self.kept_v[:, :, a:b], self.kept_valid[:, a:b] = kt, vt, ok
        self.kept_pos.fill_(b)
        self.kept_filled = b
        # this call's own keys keep their graph (training through a cache); the cache keeps values
        keys = torch.cat([self.kept_k[:, :, :a], k.transpose(1, 2)], 2)
        values = torch.cat([self.kept_v[:, :, :a], v.transpose(1, 2)], 2)
        return keys, values, self.kept_valid[:, :b]

    def advance(self, num_new_tokens: int, valid: torch.Tensor | None = None) -> None:
        """Count tokens that an in-place step added to the ring; ``valid`` [B, T] counts in place."""
        if not DecodeMode.count_outside:
            self.cumulative_length += num_new_tokens
        if valid is not None:
            if self.valid_count is None:
                raise RuntimeError("valid tokens were not counted from the start of this cache")
            self.valid_count.add_(valid.long().sum(1))

    def _mirror(self, track_device: bool = True) -> None:
        """Expose the state through the attributes transformers' generic code reads."""
        st = self.held
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
        # Sized like a full-attention layer, so a mask built from this slot (transformers sizes the masks from the
        # first layer) fits the softmax layers: a static cache's whole length when the slot was a static layer.
        if self.static_len:
            return self.static_len, 0
        return self.cumulative_length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    @property
    def is_croppable(self) -> bool:
        return not self.has_state

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0 and self.has_state:
            raise RuntimeError("cannot crop a linearized layer's cache: its recurrent sums cannot drop tokens")

    def reset(self) -> None:
        self._state, self._ring = None, None
        self.valid_count = self.kept_k = self.kept_v = self.kept_valid = self.kept_pos = None
        self.kept_filled = 0
        self.cumulative_length = 0
        self._mirror()

    def _index(self, index: torch.Tensor) -> None:
        if self._ring is not None:
            self._ring = self._ring.index_batch(index)
        elif self._state is not None:
            self._state = self._state.index_batch(index)
        if self.valid_count is not None:
            self.valid_count = self.valid_count.index_select(0, index.to(self.valid_count.device))
        if self.kept_k is not None:
            i = index.to(self.kept_k.device)
            self.kept_k, self.kept_v, self.kept_valid = (t.index_select(0, i) for t in (self.kept_k, self.kept_v, self.kept_valid))
        self._mirror()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._index(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if indices.dtype == torch.bool:
            indices = indices.nonzero().flatten()
        self._index(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        st = self.held
        if st is not None:
            B = st.S.shape[0]
            self._index(torch.arange(B, device=st.S.device).repeat_interleave(repeats))

    def _move(self, device) -> None:
        if self._ring is not None:
            self._ring = self._ring.to(device)
        elif self._state is not None:
            self._state = self._state.to(device)
        if self.valid_count is not None:
            self.valid_count = self.valid_count.to(device, non_blocking=True)
        if self.kept_k is not None:
            self.kept_k, self.kept_v, self.kept_valid, self.kept_pos = (
                t.to(device) for t in (self.kept_k, self.kept_v, self.kept_valid, self.kept_pos))

    def offload(self) -> None:
        if self.has_state:
            self._move("cpu")
            self._mirror(track_device=False)

    def prefetch(self) -> None:
        st = self.held
        if st is not None and self.device is not None and st.k.device != self.device:
            self._move(self.device)
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
    new = layers[layer_idx] = HybridCacheLayer(window)
    new.kept_capacity = getattr(cache, "_linearize_kept_capacity", 0)  # (linearize.decode.reserve_kept_heads)
    if isinstance(layer, StaticLayer) and not isinstance(layer, StaticSlidingWindowLayer):
        new.static_len = layer.max_cache_len
        # a static cache is sized for the whole run: so are the kept heads' buffers, which a step captured in
        # a CUDA graph could not grow (replays would write past them)
        new.kept_capacity = max(new.kept_capacity, layer.max_cache_len)
    return new
