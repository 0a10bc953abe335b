"""The floor of one decode step of a whole model: fewest bytes and FLOPs, from the model's own modules.

The formulas are written out in ``generate.py``'s docstring; this module evaluates them. Per decode step
of a batch of B sequences (``e`` = bytes of the model dtype, 2 for bf16):

* weights: every parameter read once (a tied input embedding is the output head's matrix, counted once;
  an untied input embedding is read only at the B token rows);
* a softmax layer: its KV cache read, ``B * T_keys * 2 * Hkv * D * e`` (``T_keys`` = the keys the new token
  attends to, ``min(T, window)`` for a sliding layer), and the new k, v written, ``B * 2 * Hkv * D * e``;
* a hybrid layer: the fp32 state S and z read and written, ``2 * 4 * B * H' * (F * D + F)``; the window
  tail read, ``B * (W - 1) * 2 * Hkv * D * e``, and the evicted key's features, ``B * H' * F * e``; the new
  k, v, phi_k written into the ring, ``B * (2 * Hkv * D + H' * F) * e``;
* the logits written, ``B * V * e``.
Activations between kernels (a few ``B * hidden`` vectors per layer) are not counted.
FLOPs: 2 per multiply-add of every matrix (``2 * B * matmul params``, feature maps included) plus the
attention: ``4 * B * H * D * T_keys`` (softmax) or ``B * H * (4 * D * W + 4 * F * D + 3 * F)`` (hybrid).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from linearize.cache_bytes import FP32, LayerShape, cache_bytes_per_sequence, hybrid_bytes_per_sequence, layer_shapes

__all__ = ["FP32", "LayerShape", "ModelShape", "decode_run_cost", "hybrid_bytes_per_sequence", "keys_summed", "model_shape",
           "state_bytes_per_sequence"]


@dataclass(frozen=True)
class ModelShape:
    layers: tuple[LayerShape, ...]
    weight_bytes: int  # parameters read whole every step
    embed_row_bytes: int  # an untied input embedding: bytes of one row (read B times); 0 when tied
    matmul_params: int  # weights of matrix products (2 FLOPs each per token)
    vocab: int
    elem: int  # bytes of the model dtype (activations, caches, ring)

    @property
    def hybrid_layers(self) -> int:
        return sum(layer.kind == "hybrid" for layer in self.layers)


def model_shape(model: nn.Module) -> ModelShape:
    """Read the shapes a decode step touches off an HF causal LM, linearized or not."""
    emb_in, emb_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    tied = emb_in.data_ptr() == emb_out.data_ptr()
    seen, weight_bytes = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen or (not tied and p is emb_in):
            continue
        seen.add(p.data_ptr())
        weight_bytes += p.numel() * p.element_size()
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    matmul += sum(p.numel() for n, p in model.named_parameters() if "feature_map" in n and n.endswith("weight"))
    return ModelShape(
        layers=layer_shapes(model),
        weight_bytes=weight_bytes,
        embed_row_bytes=0 if tied else emb_in.shape[1] * emb_in.element_size(),
        matmul_params=matmul,
        vocab=emb_out.shape[0],
        elem=emb_out.element_size(),
    )


def keys_summed(prompt: int, new_tokens: int, window: int = 0) -> int:
    """Sum over the decode steps i = 1 .. new_tokens - 1 of the keys step i attends to: ``prompt + i``
    (its own included), at most ``window`` when ``window`` > 0."""
    total = 0
    for i in range(1, new_tokens):
        t = prompt + i
        total += min(t, window) if window > 0 else t
    return total


@dataclass(frozen=True)
class RunCost:
    """Totals over the decode steps of one run (the prefill excluded); per-step means by ``steps``."""

    steps: int
    bytes: float
    flops: float
    parts: dict  # bytes by term: weights, kv, state, tail, logits

    def floor_s(self, copy_gbps: float, matmul_tflops: float | None) -> float:
        t_bytes = self.bytes / (copy_gbps * 1e9)
        t_flops = self.flops / (matmul_tflops * 1e12) if matmul_tflops else 0.0
        return max(t_bytes, t_flops)


def decode_run_cost(shape: ModelShape, B: int, prompt: int, new_tokens: int) -> RunCost:
    """Bytes and FLOPs of the ``new_tokens - 1`` decode steps after a ``prompt``-token prefill (the first
    new token comes from the prefill), as the module docstring counts them."""
    steps = max(new_tokens - 1, 0)
    e = shape.elem
    parts = {"weights": 0.0, "kv": 0.0, "state": 0.0, "tail": 0.0, "logits": 0.0}
    flops = 2.0 * B * shape.matmul_params * steps
    parts["weights"] = (shape.weight_bytes + B * shape.embed_row_bytes) * steps
    parts["logits"] = B * shape.vocab * e * steps
    for L in shape.layers:
        if L.kind == "softmax":
            keys = keys_summed(prompt, new_tokens, L.window)
            parts["kv"] += B * 2 * L.Hkv * L.D * e * (keys + steps)
            flops += 4.0 * B * L.H * L.D * keys
        else:
            W = L.window if L.window >= 2 else 0
            parts["state"] += 2 * FP32 * B * L.Hf * (L.F * L.D + L.F) * steps
            tail = (max(W - 1, 0) * 2 * L.Hkv * L.D + (L.Hf * L.F if W else 0)) * e
            new = (2 * L.Hkv * L.D + L.Hf * L.F) * e if W else 0
            parts["tail"] += B * (tail + new) * steps
            flops += 1.0 * B * L.H * (4 * L.D * L.window + 4 * L.F * L.D + 3 * L.F) * steps
    return RunCost(steps=steps, bytes=sum(parts.values()), flops=flops, parts=parts)


def state_bytes_per_sequence(shape: ModelShape, total_len: int) -> int:
    """Bytes a sequence holds in the cache at ``total_len`` tokens (``linearize.cache_bytes``), in the model dtype."""
    return cache_bytes_per_sequence(shape.layers, shape.elem, total_len)
