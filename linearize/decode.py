"""A compiled decode step for a linearized model: one ``torch.compile`` graph per batch size.

Why: a decode step is launch-bound. The base SmolLM2-135M runs 1,109 small kernels a token (37 a
layer), and ~4 µs each makes a 4-5 ms step against a 0.36 ms memory floor at batch 64, even replayed in a
CUDA graph (``benchmarks/README.md``). Inductor fuses the norms, RoPE, the feature maps and the
elementwise glue into few kernels. The step stays capturable in a CUDA graph, because every state is
updated in place.

    step = CompiledDecode(model)                  # kept softmax layers: prefill into a StaticCache
    logits = model(input_ids=prompt, cache=cache, use_cache=True).logits   # prefill, eager (past_key_values= before 5.24)
    logits = step(next_ids, position_ids, cache)  # [B, 1] ids, [1, 1] or [B, 1] positions -> [B, 1, V]

What makes it one graph and no recompiles (``linearize.modules.cache.DecodeMode`` while the step runs):

* the layers decode on their ring state (fixed buffers, updated in place), with the Triton kernel or,
  ``kernel=False``, the PyTorch ring step that inductor fuses itself;
* the cache's token count, a Python int, is advanced here after the step, not in the traced code;
* a 4D all-true mask makes transformers' mask preparation return at once. It would otherwise read the growing
  sequence length. A decode token is always valid: left padding was masked into the state by the prefill;
* kept softmax layers attend through ``linearize.modules.softmax_decode`` (the Triton split-K kernel, which
  reads a static cache only as far as its mask is True) while ``kernel`` is on, else through SDPA.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

from .convert import is_linearized, kept_softmax_layers, linearized_layers
from .models import cache_kwarg
from .modules.cache import DecodeMode, HybridCacheLayer
from .modules.fused_projections import FusedProjections
from .ops.ring import RingState
from .modules.softmax_decode import softmax_decode_kernel


@contextmanager
def decode_mode(*, kernel: bool, fuse_maps: bool = False, fuse_rope: bool = False):
    names = ("ring", "kernel", "count_outside", "fuse_maps", "fuse_rope")
    saved = tuple(getattr(DecodeMode, n) for n in names)
    for n, value in zip(names, (True, kernel, True, fuse_maps, fuse_rope and fuse_maps)):
        setattr(DecodeMode, n, value)
    try:
        yield
    finally:
        for n, value in zip(names, saved):
            setattr(DecodeMode, n, value)


def fusable_map_layers(model, rope: bool = False) -> list[int]:
    """Indices of the linearized layers whose feature maps ``CompiledDecode(fuse_maps=True)`` computes with
    the Triton map kernel (``LinearizedAttention.maps_fusable``: Hedgehog maps); with ``rope``, those whose
    RoPE goes into that launch too (``fuse_rope``: rotate-half RoPE, every head hybrid)."""
    from .modules.attention import LinearizedAttention

    return [i for i, layer in enumerate(model.base_model.layers)
            if isinstance(a := layer.self_attn, LinearizedAttention) and (a.rope_fusable if rope else a.maps_fusable)]


def fuse_projections_default(model) -> bool:
    """``CompiledDecode``'s default for ``fuse_projections``: on where it was measured faster, CUDA."""
    return next(model.parameters()).device.type == "cuda"


class CompiledDecode:
    """``step(input_ids [B, 1], position_ids, cache[, attention_mask]) -> logits [B, 1, V]``, compiled on first call.

    ``kernel``: use the Triton decode kernels inside the graph where they serve (CUDA): the ring step, and the
    kept softmax layers' split-K attention; False gives inductor the PyTorch ring step and SDPA.
    ``compile``: False runs the same step eagerly (a reference for tests). ``fuse_maps`` (with ``kernel``, on by
    default): a layer's two Hedgehog feature maps run as one Triton launch
    (``linearize.ops.triton.feature_maps``) instead of the six kernels inductor makes of them (a permuted
    copy, two batched GEMMs, two softmax reductions and their pointwise halves: 12.5 us a layer of SmolLM2 at
    B 64 on the H200). (Computing the maps inside the ring kernel itself was slower there: 36-70 us a layer
    against 21.) ``fuse_rope`` (with ``fuse_maps``): that launch also applies RoPE to q and k
    (``rope_hedgehog_pair_triton``) where the architecture's RoPE is transformers' rotate-half form, in place of
    the two pointwise kernels inductor makes of RoPE (5.2 us a layer of the 8B at B 64 on the H100). On by default:
    the 8B's step at B 64 went from 7.747 to 7.646 ms with it on one H100 (``scripts/gpu_decode_calls.sh 33``,
    2026-12-06, ``benchmarks/results/generate-nvidia-h100-80gb-hbm3-20261206-083951``).
    ``fuse_projections``: one GEMM for q/k/v and one for gate/up in every layer that allows it
    (``linearize.modules.fused_projections``: 3 fewer launches a layer). Those weights move into one tensor each
    and the modules' parameters become row views of it: no memory is added, and ``close()`` (or leaving
    ``with CompiledDecode(model) as step:``) gives them their own storage back. On the H200 it took SmolLM2's
    step at B 64 from 2.305 to 2.007 ms (``benchmarks/results/generate-nvidia-h200-20261203-225408``).
    Default (None): on when the model is on CUDA; True or False forces it.
    ``compile_options`` go to ``torch.compile`` (default ``fullgraph=True, dynamic=False``).

    A model that keeps full-attention softmax layers (``LinearizeConfig.softmax_layers``) decodes here too,
    on a ``transformers.StaticCache`` sized for the whole run (prompt + new tokens): its kept layers then
    hold fixed buffers, and the step builds their mask on the device from the static layer's own token count.
    Left padding of the prompt reaches those layers through ``attention_mask``, the 2D mask over every token
    so far (as ``generate`` keeps it); the linearized layers took theirs from the prefill.
    """

    def __init__(self, model, *, kernel: bool = True, compile: bool = True, fuse_maps: bool = True,
                 fuse_rope: bool = True, fuse_projections: bool | None = None, **compile_options):
        if not is_linearized(model):
            raise ValueError("CompiledDecode decodes a linearized model (linearize.convert); this one has no linearized layer")
        layers = model.base_model.layers
        self.softmax_layers = list(kept_softmax_layers(model))
        sliding = [i for i in self.softmax_layers if getattr(layers[i].self_attn, "sliding_window", None)]
        if sliding:
            raise ValueError(
                f"CompiledDecode serves kept full-attention layers; layers {sliding} are sliding-window softmax "
                "(their static cache is a ring that a plain 4D mask cannot address): decode this model eagerly"
            )
        # layers with heads kept softmax (LinearizeConfig.softmax_heads): their KV buffers grow outside the step
        self.kept_head_layers = [a.layer_idx for a in linearized_layers(model) if a.kept_kv_heads]
        self.model = model
        self.kernel = kernel
        self.fuse_maps = fuse_maps and kernel
        self.fuse_rope = fuse_rope and self.fuse_maps
        if fuse_projections is None:
            fuse_projections = fuse_projections_default(model)
        self.fused = FusedProjections(model) if fuse_projections else None
        opts = {"fullgraph": True, "dynamic": False} | compile_options
        self._cache_kw = cache_kwarg()  # a str fixed before tracing
        self._fn = torch.compile(self._forward, **opts) if compile else self._forward

    def close(self) -> None:
        """Give the fused projections' modules their own weight storage back (``fuse_projections``), when done
        decoding. A CUDA graph captured over the step must not replay after it (it reads the freed tensors); a
        later call of the step moves the weights again."""
        if self.fused is not None:
            self.fused.release()

    def __enter__(self) -> CompiledDecode:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _forward(self, input_ids, position_ids, cache, mask4):
        if self.softmax_layers:
            # [B, 1, 1, L]: the kept layers' slots filled so far plus the new token's, minus left padding.
            # The count is the static layer's device tensor, so the mask needs no host value (capturable).
            static = cache.layers[self.softmax_layers[0]]
            slots = torch.arange(mask4.shape[-1], device=mask4.device)
            mask4 = mask4 & (slots <= static.cumulative_length)
        out = self.model(input_ids=input_ids, attention_mask=mask4, use_cache=True, position_ids=position_ids,
                         logits_to_keep=1, **{self._cache_kw: cache})
        return out.logits

    def _check_cache(self, cache) -> list[HybridCacheLayer]:
        layers = [layer for layer in cache.layers if isinstance(layer, HybridCacheLayer)]
        n_lin = self.model.config.num_hidden_layers - len(self.softmax_layers)
        if len(layers) != n_lin or not all(layer.has_state for layer in layers):
            raise ValueError("CompiledDecode continues a cache filled by a prefill of the same model; run the prompt through the model first")
        for i in self.softmax_layers:
            layer = cache.layers[i]
            if not isinstance(layer, StaticLayer) or isinstance(layer, StaticSlidingWindowLayer) or not layer.is_initialized:
                raise ValueError(
                    f"layer {i} is kept softmax and its cache layer is {type(layer).__name__}: prefill into a "
                    "transformers.StaticCache(config=model.config, max_cache_len=prompt + new tokens) for CompiledDecode"
                )
        return layers

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T = input_ids.shape
        if T != 1:
            raise ValueError(f"CompiledDecode takes one token per sequence ([B, 1] ids); got {tuple(input_ids.shape)}: prefill eagerly")
        layers = self._check_cache(cache)
        for layer in layers:  # into ring form eagerly: the conversion is not part of the step
            layer.ring_state()
        mixed = [cache.layers[i] for i in self.kept_head_layers]
        for layer in mixed:  # room for this token, outside the step (reserve_kept_heads: room for the whole run)
            layer.make_room_kept(layer.kept_filled + T)
        # The mask buffer belongs to this cache (this run), so it lives on it: the kept layers' padding then does
        # not leak into a later run on another cache, and a run keeps what its masks said so far. Without kept
        # layers it is one all-true slot.
        L = cache.layers[self.softmax_layers[0]].max_cache_len if self.softmax_layers else 1
        mask4 = getattr(cache, "_linearize_mask4", None)
        if mask4 is None or mask4.shape != (B, 1, 1, L) or mask4.device != input_ids.device:
            mask4 = cache._linearize_mask4 = torch.ones(B, 1, 1, L, dtype=torch.bool, device=input_ids.device)
        if attention_mask is not None and self.softmax_layers:
            L = mask4.shape[-1]
            n = attention_mask.shape[-1]
            if attention_mask.shape[0] != B or n > L:
                raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must be [{B}, n <= {L}] (every token so far)")
            mask4[:, 0, 0, :n].copy_(attention_mask.bool())  # (eager: its width grows every token)
            mask4[:, 0, 0, n:].fill_(True)
        kept = softmax_decode_kernel(self.model, self.softmax_layers) if self.kernel and self.softmax_layers else nullcontext()
        fused = self.fused.active() if self.fused is not None else nullcontext()
        with decode_mode(kernel=self.kernel, fuse_maps=self.fuse_maps, fuse_rope=self.fuse_rope), kept, fused:
            # (contiguous: a view's strides would be guarded on, and a growing buffer's view changes them)
            logits = self._fn(input_ids.contiguous(), position_ids.contiguous(), cache, mask4)
        # Every ring's position at once (count_outside: the layers' ring steps left it), one launch instead of one a
        # layer. After the compiled step, not inside it: inside, the compiled PyTorch ring steps (kernel=False) went
        # wrong on CUDA from the 4th step on (H100, 2026-12-06: 3 GPU tests failed; right on the CPU), and after it
        # every compiled-decode GPU test passes.
        # A layer that stepped without its ring (a gradient was wanted) holds an ordered state instead.
        positions = [layer.held.pos for layer in layers if isinstance(layer.held, RingState)]
        if positions:
            torch._foreach_add_(positions, 1)
        for layer in layers:
            layer.cumulative_length += T
        for layer in mixed:
            layer.kept_filled += T
        return logits


def kept_heads_short(cache, length: int) -> str | None:
    """Why a step captured now (a CUDA graph) would write past the KV buffers of heads kept softmax before the
    cache holds ``length`` tokens, or None. Replays cannot grow those buffers; ``reserve_kept_heads`` before
    the prefill sizes them for the whole run."""
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, HybridCacheLayer) and layer.kept_k is not None and layer.kept_k.shape[2] < length:
            return (f"layer {i}'s heads kept softmax hold {layer.kept_k.shape[2]} tokens, fewer than the {length} this "
                    f"run reaches: call linearize.decode.reserve_kept_heads(cache, {length}) before the prefill")
    return None


def reserve_kept_heads(cache, max_len: int) -> None:
    """Have the heads that layers keep softmax (``LinearizeConfig.softmax_heads``) hold ``max_len`` tokens in
    ``cache`` without growing: allocated whole by the prefill (the memory of the last token from the first;
    a compiled step then never meets a new shape). Call it before the prefill; layers already filled grow now."""
    cache._linearize_kept_capacity = max_len
    for layer in cache.layers:
        if isinstance(layer, HybridCacheLayer):
            layer.reserve_kept(max_len)
