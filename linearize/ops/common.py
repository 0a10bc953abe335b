"""Input checks and small helpers shared by every implementation of the hybrid attention."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dims:
    """Sizes read off the inputs. ``Gk`` is 1 when key feature maps are per KV head, else ``G``."""

    B: int
    T: int
    H: int
    Hkv: int
    G: int
    Hf: int
    Gk: int
    D: int
    F: int


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    window: int,
) -> Dims:
    """Validate shapes once, so every implementation fails with the same one-line message."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, T, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(f"k and v must be [B, T, Hkv, D] matching q {tuple(q.shape)}; got {tuple(k.shape)}, {tuple(v.shape)}")
    Hkv = k.shape[2]
    if H % Hkv:
        raise ValueError(f"the number of query heads ({H}) must be a multiple of the key/value heads ({Hkv})")
    if phi_q.dim() != 4 or phi_q.shape[:3] != (B, T, H):
        raise ValueError(f"phi_q must be [B, T, H, F] = [{B}, {T}, {H}, F]; got {tuple(phi_q.shape)}")
    F = phi_q.shape[3]
    Hf = phi_k.shape[2] if phi_k.dim() == 4 else -1
    if phi_k.dim() != 4 or phi_k.shape[:2] != (B, T) or Hf not in (Hkv, H) or phi_k.shape[3] != F:
        raise ValueError(f"phi_k must be [B, T, Hkv or H, F] = [{B}, {T}, {Hkv} or {H}, {F}]; got {tuple(phi_k.shape)}")
    if not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be an int >= 0; got {window!r}")
    G = H // Hkv
    return Dims(B=B, T=T, H=H, Hkv=Hkv, G=G, Hf=Hf, Gk=Hf // Hkv, D=D, F=F)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulate in fp32 (fp64 stays fp64, for reference checks)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def default_scale(scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def window_weight_vector(window_weight: float | torch.Tensor, H: int, dtype: torch.dtype, device) -> torch.Tensor:
    """gamma as an [H] tensor; a python scalar or a 0-d / [1] / [H] tensor is accepted, gradients flow."""
    if not torch.is_tensor(window_weight):
        window_weight = torch.tensor(float(window_weight))
    g = window_weight.to(device=device, dtype=dtype)
    if g.numel() == 1:
        return g.reshape(1).expand(H)
    if g.shape != (H,):
        raise ValueError(f"window_weight must be a scalar or an [H]={H} tensor; got shape {tuple(g.shape)}")
    return g


def key_mask(attention_mask: torch.Tensor | None, B: int, T: int, device) -> torch.Tensor:
    """[B, T] bool validity of the new tokens' keys (False = padding)."""
    if attention_mask is None:
        return torch.ones(B, T, dtype=torch.bool, device=device)
    if attention_mask.shape != (B, T):
        raise ValueError(f"attention_mask must be [B, T] = [{B}, {T}]; got {tuple(attention_mask.shape)}")
    return attention_mask.to(device=device).bool()


def window_exp(s: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """exp(s - m) on the allowed keys (0 elsewhere), m the row max over allowed keys (0 if none):
    the window part of the hybrid, unnormalized, since it shares its normalizer with the linear part."""
    masked = s.masked_fill(~allowed, float("-inf"))
    m = masked.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    # exp of the masked scores, not where(allowed, exp(s - m), 0): a key outside the window whose score is far
    # above the row's max (Qwen2.5's layer 2 has such future keys) overflows exp to inf, and where()'s backward
    # multiplies that inf by a zero gradient: NaN in every gradient below the layer.
    return torch.exp(masked - m)


def safe_divide(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, with 0 where den == 0 (padding queries that see no valid key)."""
    ok = den > 0
    return torch.where(ok.unsqueeze(-1), num / torch.where(ok, den, torch.ones_like(den)).unsqueeze(-1), torch.zeros_like(num))
