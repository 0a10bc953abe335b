"""One GEMM for q/k/v and one for gate/up in a decode step, from concatenated copies of the weights.

Why: at decode, a layer's projections are GEMMs with M = batch (64): each costs about one kernel's minimum
time (~3.7 µs on the H200, for ~0.25 µs of weight traffic), so a layer's 7 GEMMs are most of the step
(``benchmarks/README.md``). q, k, v read the same input, as do gate and up: one GEMM each on the
concatenated weights does the same work with 3 fewer launches a layer.

``FusedProjections(model)`` builds the concatenated weights once (extra memory: one copy of the q, k, v, gate
and up weights) and, inside ``with fused.active():``, the linearized layers project through them
(``LinearizedAttention.project`` reads ``fused_qkv``) and the MLPs run a fused forward. It covers:

* q/k/v of a ``LinearizedAttention`` whose three projections are plain ``nn.Linear`` (all with a bias or none);
  a wrapped projection (peft LoRA not merged) keeps the layer as it is;
* an MLP with plain ``gate_proj``/``up_proj``/``down_proj`` and ``act_fn`` whose forward is
  ``down(act(gate(x)) * up(x))``, which is checked on a random input when the copies are built.
The copies follow the weights: ``refresh()`` (called by ``active()``) rebuilds a layer's copy when a weight's
version counter moved (an optimizer step, ``load_state_dict``), so a stale copy is never used.
"""

from __future__ import annotations

import types
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .attention import LinearizedAttention


def _plain(*mods) -> bool:
    return all(type(m) is nn.Linear for m in mods) and len({m.bias is None for m in mods}) == 1


def _cat(mods) -> tuple[torch.Tensor, torch.Tensor | None]:
    with torch.no_grad():
        w = torch.cat([m.weight for m in mods], 0)
        b = None if mods[0].bias is None else torch.cat([m.bias for m in mods], 0)
    return w, b


def _versions(mods) -> tuple:
    return tuple((m.weight._version, None if m.bias is None else m.bias._version) for m in mods)


def _fused_mlp_forward(self, x):
    gu = F.linear(x, *self._linearize_gate_up)
    gate, up = gu.split(self.gate_proj.out_features, dim=-1)
    return self.down_proj(self.act_fn(gate) * up)


def fusable_parts(model) -> tuple[list[tuple[LinearizedAttention, tuple]], list[tuple[nn.Module, tuple]]]:
    """(attention layers with their plain q/k/v, MLPs with their plain gate/up) that ``FusedProjections``
    may fuse; an MLP whose forward is not ``down(act(gate(x)) * up(x))`` is dropped later, on a random input."""
    attns, mlps = [], []
    for layer in model.base_model.layers:
        attn = getattr(layer, "self_attn", None)
        if isinstance(attn, LinearizedAttention) and _plain(attn.q_proj, attn.k_proj, attn.v_proj):
            attns.append((attn, (attn.q_proj, attn.k_proj, attn.v_proj)))
        mlp = getattr(layer, "mlp", None)
        parts = tuple(getattr(mlp, n, None) for n in ("gate_proj", "up_proj"))
        if (mlp is not None and all(isinstance(p, nn.Module) for p in parts) and _plain(*parts)
                and isinstance(getattr(mlp, "down_proj", None), nn.Module) and callable(getattr(mlp, "act_fn", None))):
            mlps.append((mlp, parts))
    return attns, mlps


def fused_copy_bytes(model) -> int:
    """Bytes ``FusedProjections(model)`` would allocate at most (before the MLP check), without building it."""
    attns, mlps = fusable_parts(model)
    return sum(p.numel() * p.element_size() for _, parts in attns + mlps for m in parts for p in m.parameters(recurse=False))


class FusedProjections:
    """Concatenated q/k/v and gate/up weights of a model's decoder layers, and the switch that uses them."""

    def __init__(self, model):
        self.attn, self.mlps = fusable_parts(model)
        self._copies: dict[int, tuple] = {}  # id(module) -> (versions, (W, b))
        self.refresh()
        self.mlps = [(m, p) for m, p in self.mlps if self._mlp_matches(m)]
        kept = {id(m) for m, _ in self.attn + self.mlps}
        self._copies = {k: v for k, v in self._copies.items() if k in kept}  # a rejected MLP's copy is freed

    @property
    def fused_layers(self) -> tuple[int, int]:
        """(attention layers with one q/k/v GEMM, MLPs with one gate/up GEMM)."""
        return len(self.attn), len(self.mlps)

    def extra_bytes(self) -> int:
        return sum(w.numel() * w.element_size() + (0 if b is None else b.numel() * b.element_size())
                   for _, (w, b) in self._copies.values())

    def refresh(self) -> None:
        for mod, parts in self.attn + self.mlps:
            v = _versions(parts)
            held = self._copies.get(id(mod))
            if held is None or held[0] != v or held[1][0].device != parts[0].weight.device:
                self._copies[id(mod)] = (v, _cat(parts))

    def _mlp_matches(self, mlp) -> bool:
        """The fused forward equals the module's own on a random input (an MLP that is not
        ``down(act(gate(x)) * up(x))`` keeps its forward)."""
        w = mlp.gate_proj.weight
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(1, 2, mlp.gate_proj.in_features, generator=g).to(w.device, w.dtype)
        with torch.no_grad():
            ref = mlp(x)
            mlp._linearize_gate_up = self._copies[id(mlp)][1]
            try:
                got = _fused_mlp_forward(mlp, x)
            finally:
                del mlp._linearize_gate_up
        tol = 1e-5 if w.dtype in (torch.float32, torch.float64) else 2e-2
        return got.shape == ref.shape and torch.allclose(got.float(), ref.float(), rtol=tol, atol=tol)

    @contextmanager
    def active(self):
        self.refresh()
        for attn, _ in self.attn:
            attn.fused_qkv = self._copies[id(attn)][1]
        for mlp, _ in self.mlps:
            mlp._linearize_gate_up = self._copies[id(mlp)][1]
            mlp.forward = types.MethodType(_fused_mlp_forward, mlp)
        try:
            yield
        finally:
            for attn, _ in self.attn:
                attn.fused_qkv = None
            for mlp, _ in self.mlps:
                del mlp.forward, mlp._linearize_gate_up
