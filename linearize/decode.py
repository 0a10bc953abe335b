"""A compiled decode step for a fully linearized model: one ``torch.compile`` graph per batch size.

Why: a decode step is launch-bound. The base SmolLM2-135M runs 1,109 small kernels a token (37 a
layer), and ~4 µs each makes a 4-5 ms step against a 0.36 ms memory floor at batch 64, even replayed in a
CUDA graph (``benchmarks/README.md``). Inductor fuses the norms, RoPE, the feature maps and the
elementwise glue into few kernels. The step stays capturable in a CUDA graph, because every state is
updated in place.

    step = CompiledDecode(model)                  # every attention layer must be linearized
    logits = model(input_ids=prompt, past_key_values=cache, use_cache=True).logits   # prefill, eager
    logits = step(next_ids, position_ids, cache)  # [B, 1] ids, [1, 1] or [B, 1] positions -> [B, 1, V]

What makes it one graph and no recompiles (``linearize.modules.cache.DecodeMode`` while the step runs):

* the layers decode on their ring state (fixed buffers, updated in place), with the Triton kernel or,
  ``kernel=False``, the PyTorch ring step that inductor fuses itself;
* the cache's token count, a Python int, is advanced here after the step, not in the traced code;
* a 4D all-true mask makes transformers' mask preparation return at once. It would otherwise read the growing
  sequence length. A decode token is always valid: left padding was masked into the state by the prefill.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .convert import linearized_layers
from .modules.cache import DecodeMode, HybridCacheLayer


@contextmanager
def decode_mode(*, kernel: bool):
    saved = (DecodeMode.ring, DecodeMode.kernel, DecodeMode.count_outside)
    DecodeMode.ring, DecodeMode.kernel, DecodeMode.count_outside = True, kernel, True
    try:
        yield
    finally:
        DecodeMode.ring, DecodeMode.kernel, DecodeMode.count_outside = saved


class CompiledDecode:
    """``step(input_ids [B, 1], position_ids, cache) -> logits [B, 1, V]``, compiled on first call.

    ``kernel``: use the Triton decode kernel inside the graph where it serves (CUDA); False gives inductor
    the PyTorch ring step. ``compile``: False runs the same step eagerly (a reference for tests).
    ``compile_options`` go to ``torch.compile`` (default ``fullgraph=True, dynamic=False``).
    """

    def __init__(self, model, *, kernel: bool = True, compile: bool = True, **compile_options):
        n_attn = model.config.num_hidden_layers
        n_lin = len(linearized_layers(model))
        if n_lin != n_attn:
            raise ValueError(
                f"CompiledDecode needs every attention layer linearized; this model keeps {n_attn - n_lin} of {n_attn} "
                "as softmax (their KV cache grows every token, so one static graph cannot serve them): decode it eagerly"
            )
        self.model = model
        self.kernel = kernel
        opts = {"fullgraph": True, "dynamic": False} | compile_options
        self._fn = torch.compile(self._forward, **opts) if compile else self._forward
        self._masks: dict[tuple, torch.Tensor] = {}

    def _forward(self, input_ids, position_ids, cache, mask4):
        out = self.model(input_ids=input_ids, attention_mask=mask4, past_key_values=cache, use_cache=True,
                         position_ids=position_ids, logits_to_keep=1)
        return out.logits

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache) -> torch.Tensor:
        B, T = input_ids.shape
        if T != 1:
            raise ValueError(f"CompiledDecode takes one token per sequence ([B, 1] ids); got {tuple(input_ids.shape)}: prefill eagerly")
        layers = [layer for layer in cache.layers if isinstance(layer, HybridCacheLayer)]
        if len(layers) != self.model.config.num_hidden_layers or not all(layer.has_state for layer in layers):
            raise ValueError("CompiledDecode continues a cache filled by a prefill of the same model; run the prompt through the model first")
        for layer in layers:  # into ring form eagerly: the conversion is not part of the step
            layer.ring_state()
        key = (B, input_ids.device)
        if key not in self._masks:
            self._masks[key] = torch.ones(B, 1, 1, 1, dtype=torch.bool, device=input_ids.device)
        with decode_mode(kernel=self.kernel):
            # (contiguous: a view's strides would be guarded on, and a growing buffer's view changes them)
            logits = self._fn(input_ids.contiguous(), position_ids.contiguous(), cache, self._masks[key])
        for layer in layers:
            layer.cumulative_length += T
        return logits
