"""Feature maps phi for the linear part of the hybrid attention, chosen by name from a registry.

Every map takes x [B, T, Hx, D] and returns phi(x) [B, T, Hout, F]. Maps with per-head parameters
are built for ``num_heads`` output heads; given fewer input heads (GQA keys: Hx = Hkv), each group of
``num_heads // Hx`` maps reads the same input head without copying it.
"""

from __future__ import annotations

import abc
import math
import os
from typing import Callable

import torch
import torch.nn as nn

FEATURE_MAPS: dict[str, type["FeatureMap"]] = {}


def register(name: str) -> Callable[[type["FeatureMap"]], type["FeatureMap"]]:
    def deco(cls: type["FeatureMap"]) -> type["FeatureMap"]:
        cls.name = name
        FEATURE_MAPS[name] = cls
        return cls

    return deco


def build_feature_map(name: str, num_heads: int, head_dim: int, feature_dim: int) -> "FeatureMap":
    if name not in FEATURE_MAPS:
        raise ValueError(f"unknown feature_map {name!r}; choose one of {sorted(FEATURE_MAPS)}")
    return FEATURE_MAPS[name](num_heads, head_dim, feature_dim)


class FeatureMap(nn.Module, abc.ABC):
    """Base class. ``output_dim`` is F, ``has_params`` says whether heads need their own weights."""

    name = "base"
    has_params = True

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int):
        super().__init__()
        self.num_heads, self.head_dim, self.feature_dim = num_heads, head_dim, feature_dim

    @property
    @abc.abstractmethod
    def output_dim(self) -> int:
        """F, the size of phi(x) per head."""

    def reset_parameters(self) -> None:
        """(Re)initialise parameters; called on conversion and for weights missing from a checkpoint."""

    def _project(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [B,T,Hx,D] @ weight [H,D,f] per head -> [B,T,H,f], grouping H over Hx without a copy of x."""
        B, T, Hx, D = x.shape
        H = weight.shape[0]
        if H % Hx:
            raise ValueError(f"feature map has {H} heads, which is not a multiple of the input's {Hx}")
        w = weight.view(Hx, H // Hx, D, weight.shape[-1]).to(x.dtype)
        return torch.einsum("bthd,hgdf->bthgf", x, w).reshape(B, T, H, -1)


def _identity_slice(num_heads: int, rows: int, cols: int) -> torch.Tensor:
    return torch.eye(rows, cols).unsqueeze(0).repeat(num_heads, 1, 1)


class ProjectedFeatureMap(FeatureMap):
    """A map that starts with a per-head projection ``W [H, D, f]``, initialised to an identity slice
    (so before training it keeps the first f coordinates of x)."""

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int):
        super().__init__(num_heads, head_dim, feature_dim)
        self.weight = nn.Parameter(torch.empty(num_heads, head_dim, feature_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.copy_(_identity_slice(self.num_heads, self.head_dim, self.feature_dim))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self._project(x, self.weight)


@register("hedgehog")
class HedgehogFeatureMap(ProjectedFeatureMap):
    """LoLCATs' Hedgehog map: [softmax(xW), softmax(-xW)] per head, W [H, D, f] with no bias, F = 2f.

    The softmax runs in fp32: it is where bf16 would lose the most. This is the reference: a linearized layer
    whose two maps are Hedgehog maps computes both in one Triton kernel on CUDA (``linearize.ops.triton.
    feature_maps``, forward and backward) unless ``HedgehogFeatureMap.kernel`` is False (timing, debugging; the
    environment's ``LINEARIZE_MAP_KERNEL=0`` sets that at import; ``LINEARIZE_KERNELS=torch`` turns off every kernel).
    """

    kernel = os.environ.get("LINEARIZE_MAP_KERNEL", "1") != "0"

    @property
    def output_dim(self) -> int:
        return 2 * self.feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.project(x).float()
        return torch.cat([torch.softmax(u, dim=-1), torch.softmax(-u, dim=-1)], dim=-1).to(x.dtype)


@register("t2r")
class T2RFeatureMap(ProjectedFeatureMap):
    """Transformer-to-RNN (Kasai et al.): relu(xW + b) per head, F = f; b starts at 0."""

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int):
        super().__init__(num_heads, head_dim, feature_dim)
        self.bias = nn.Parameter(torch.zeros(num_heads, feature_dim))

    @property
    def output_dim(self) -> int:
        return self.feature_dim

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if getattr(self, "bias", None) is not None:  # absent while the base __init__ runs this
            with torch.no_grad():
                self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.project(x) + self.bias.to(x.dtype))


@register("elu")
class EluFeatureMap(FeatureMap):
    """1 + elu(x) (Katharopoulos et al.): no parameters, F = D, one output head per input head."""

    has_params = False

    @property
    def output_dim(self) -> int:
        return self.head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1 + torch.nn.functional.elu(x)


@register("taylor")
class TaylorFeatureMap(ProjectedFeatureMap):
    """Based's 2nd-order Taylor map of exp(u.u'/sqrt(f)), after a per-head projection W [H, D, f].

    phi(u) = [1, u / f^(1/4), vec(u u^T) / (sqrt(2) sqrt(f))], so phi(a).phi(b) = 1 + s + s^2/2 with
    s = a.b / sqrt(f). F = 1 + f + f^2 grows fast: use a small feature_dim (Based uses 16).
    """

    @property
    def output_dim(self) -> int:
        return 1 + self.feature_dim + self.feature_dim**2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.project(x)
        f = self.feature_dim
        second = (u.unsqueeze(-1) * u.unsqueeze(-2)).flatten(-2) / (math.sqrt(2.0) * math.sqrt(f))
        return torch.cat([torch.ones_like(u[..., :1]), u / f**0.25, second], dim=-1)
