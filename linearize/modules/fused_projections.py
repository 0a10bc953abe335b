"""One GEMM for q/k/v and one for gate/up in a decode step, on weights moved into one tensor each.

Why: at decode, a layer's projections are GEMMs with M = batch (64). Each costs about one kernel's minimum
time at the small models (~3.7 us on the H200, for ~0.25 us of weight traffic), and at 8B the narrow ones
(k, v: 1024 rows) run split-K at ~2.3x their read time (``benchmarks/README.md``). q, k, v read the same input,
as do gate and up: one GEMM each on the concatenated weights does the same work with 3 fewer launches a layer.

``FusedProjections(model)`` concatenates a layer's q, k, v weights (and its gate, up weights) into one tensor,
and makes each module's parameter a row view of it: the parameters stay the same ``nn.Parameter`` objects
with the same values, and no memory is added (a layer's old storage is freed once its views are set; the
peak is one layer's weights). Inside ``with fused.active():`` the linearized layers project through the whole
tensor (``LinearizedAttention.project`` reads ``fused_qkv``) and the MLPs run a fused forward. Since the
modules' weights are views, an in-place update (an optimizer step, ``load_state_dict``) reaches the fused
tensor too; a parameter given a new tensor (``model.to``, ``param.data = ...``) is seen by ``refresh()``
(called by ``active()``), which moves that layer again. ``release()`` gives every module its own storage
back. While the weights are views, ``save_pretrained`` still writes them apart (transformers clones disjoint
views of one storage); ``safetensors.torch.save_file`` on the live tensors would refuse them.

It covers:

* q/k/v of a ``LinearizedAttention`` whose three projections are plain ``nn.Linear`` (all with a bias or none);
  a wrapped projection (peft LoRA not merged) keeps the layer as it is;
* an MLP with plain ``gate_proj``/``up_proj``/``down_proj`` and ``act_fn`` whose forward is
  ``down(act(gate(x)) * up(x))``, which is checked on a random input when the weights are moved (an MLP that
  fails it gets its own storage back).
"""

from __future__ import annotations

import types
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .attention import LinearizedAttention


def _plain(*mods) -> bool:
    """Plain ``nn.Linear``s of one dtype and device, all with a bias or none (what one tensor can hold)."""
    return (all(type(m) is nn.Linear for m in mods) and len({m.bias is None for m in mods}) == 1
            and len({(p.dtype, p.device) for m in mods for p in m.parameters(recurse=False)}) == 1)


def _spans(mods):
    """(module, its first row, its rows) in the concatenation of ``mods``' weights."""
    row = 0
    for m in mods:
        n = m.weight.shape[0]
        yield m, row, n
        row += n


def _share(mods) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate ``mods``' weights (and biases) into one tensor each and make every module's parameter a
    row view of it -> (W [sum of out_features, in], b or None)."""
    with torch.no_grad():
        w = torch.cat([m.weight for m in mods], 0)
        b = None if mods[0].bias is None else torch.cat([m.bias for m in mods], 0)
        for m, row, n in _spans(mods):
            m.weight.data = w[row : row + n]
            if b is not None:
                m.bias.data = b[row : row + n]
    return w, b


def _is_shared(mods, fused: tuple[torch.Tensor, torch.Tensor | None]) -> bool:
    """Every module's parameters are still the row views of ``fused`` that ``_share`` made. (Called every
    step: the views' addresses are computed, not sliced.)"""
    for m, row, n in _spans(mods):
        for p, whole in ((m.weight, fused[0]), (m.bias, fused[1])):
            if whole is None:
                continue
            if (p.device != whole.device or p.dtype != whole.dtype or p.shape != (n, *whole.shape[1:])
                    or p.data_ptr() != whole.data_ptr() + row * whole.stride(0) * whole.element_size()):
                return False
    return True


def _unshare(mods) -> None:
    with torch.no_grad():
        for m in mods:
            for p in m.parameters(recurse=False):
                p.data = p.data.clone()


_QKV, _GATE_UP = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")


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
        if isinstance(attn, LinearizedAttention) and _plain(*(qkv := tuple(getattr(attn, n) for n in _QKV))):
            attns.append((attn, qkv))
        mlp = getattr(layer, "mlp", None)
        parts = tuple(getattr(mlp, n, None) for n in _GATE_UP)
        if (mlp is not None and all(isinstance(p, nn.Module) for p in parts) and _plain(*parts)
                and isinstance(getattr(mlp, "down_proj", None), nn.Module) and callable(getattr(mlp, "act_fn", None))):
            mlps.append((mlp, parts))
    return attns, mlps


class FusedProjections:
    """The q/k/v and gate/up weights of a model's decoder layers moved into one tensor each (the modules'
    parameters left as views of it), and the switch that uses them."""

    def __init__(self, model):
        self.attn, self.mlps = fusable_parts(model)
        self._fused: dict[int, tuple] = {}  # id(module) -> (W, b)
        self.refresh()
        for mlp, parts in [(m, p) for m, p in self.mlps if not self._mlp_matches(m)]:
            self._drop(mlp, parts)
            self.mlps.remove((mlp, parts))

    @property
    def fused_layers(self) -> tuple[int, int]:
        """(attention layers with one q/k/v GEMM, MLPs with one gate/up GEMM)."""
        return len(self.attn), len(self.mlps)

    def refresh(self) -> None:
        """Move again any layer whose parameters are no longer the views (given new tensors since); a layer
        whose projections were replaced since (peft wrapping them in LoRA), or no longer share one dtype and
        device, leaves the fusion, so that its own modules run."""
        self.attn = [(a, p) for a, p in self.attn if self._keep(a, p, _QKV)]
        self.mlps = [(m, p) for m, p in self.mlps if self._keep(m, p, _GATE_UP)]

    def _keep(self, mod, parts, names) -> bool:
        """Whether ``mod`` stays fused (moved again if its parameters were given new tensors), else dropped."""
        same = all(getattr(mod, n, None) is p for n, p in zip(names, parts))
        held = self._fused.get(id(mod))
        if same and held is not None and _is_shared(parts, held):
            return True  # every step but the first
        if same and _plain(*parts):
            self._fused[id(mod)] = _share(parts)
            return True
        self._drop(mod, parts)
        return False

    def _drop(self, mod, parts) -> None:
        """``mod`` leaves the fusion: its modules get their own storage back (if they are still the views)."""
        held = self._fused.pop(id(mod), None)
        if held is not None and _is_shared(parts, held):
            _unshare(parts)

    def release(self) -> None:
        """Every module's parameters get their own storage again (the fused tensors are freed layer by layer)."""
        for mod, parts in self.attn + self.mlps:
            self._drop(mod, parts)

    def _mlp_matches(self, mlp) -> bool:
        """The fused forward equals the module's own on a random input (an MLP that is not
        ``down(act(gate(x)) * up(x))`` keeps its forward)."""
        w = mlp.gate_proj.weight
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(1, 2, mlp.gate_proj.in_features, generator=g).to(w.device, w.dtype)
        with torch.no_grad():
            ref = mlp(x)
            mlp._linearize_gate_up = self._fused[id(mlp)]
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
            attn.fused_qkv = self._fused[id(attn)]
        for mlp, _ in self.mlps:
            mlp._linearize_gate_up = self._fused[id(mlp)]
            mlp.forward = types.MethodType(_fused_mlp_forward, mlp)
        try:
            yield
        finally:
            for attn, _ in self.attn:
                attn.fused_qkv = None
            for mlp, _ in self.mlps:
                del mlp.forward, mlp._linearize_gate_up
