"""The recurrent state of a hybrid attention layer, shared by the chunked and the decode paths."""

from __future__ import annotations

from typing import NamedTuple

import torch


class HybridState(NamedTuple):
    """Everything the hybrid attention needs to continue a sequence.

    The linear part is a running sum over keys that have left the softmax window; the window part is
    the last ``L <= window - 1`` keys and values themselves. ``phi_k`` of the tail is kept so that a key
    can move from the window into the linear sums without the feature map (the ops stay pure).

    Shapes (``H'`` is the number of key feature heads, ``Hkv`` or ``H``):
        S      [B, H', F, D]  float32, sum of phi(k_j) v_j^T over the linear set
        z      [B, H', F]     float32, sum of phi(k_j) over the linear set
        k      [B, L, Hkv, D] window tail keys (input dtype)
        v      [B, L, Hkv, D] window tail values
        phi_k  [B, L, H', F]  feature-mapped tail keys
        mask   [B, L]         bool, False for padding tokens (they count for nothing)
    """

    S: torch.Tensor
    z: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    phi_k: torch.Tensor
    mask: torch.Tensor

    @property
    def tail_len(self) -> int:
        return self.k.shape[1]

    @staticmethod
    def empty(
        batch: int,
        num_kv_heads: int,
        head_dim: int,
        num_feature_heads: int,
        feature_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        phi_dtype: torch.dtype | None = None,
    ) -> "HybridState":
        """A state for a sequence that has seen no token yet."""
        f32 = torch.float32
        return HybridState(
            S=torch.zeros(batch, num_feature_heads, feature_dim, head_dim, dtype=f32, device=device),
            z=torch.zeros(batch, num_feature_heads, feature_dim, dtype=f32, device=device),
            k=torch.zeros(batch, 0, num_kv_heads, head_dim, dtype=dtype, device=device),
            v=torch.zeros(batch, 0, num_kv_heads, head_dim, dtype=dtype, device=device),
            phi_k=torch.zeros(batch, 0, num_feature_heads, feature_dim, dtype=phi_dtype or dtype, device=device),
            mask=torch.zeros(batch, 0, dtype=torch.bool, device=device),
        )

    def index_batch(self, index: torch.Tensor) -> "HybridState":
        """Select / reorder / repeat sequences along the batch dimension (beam search, batch pruning)."""
        return HybridState(*(t.index_select(0, index.to(t.device)) for t in self))

    def to(self, device: torch.device | str) -> "HybridState":
        return HybridState(*(t.to(device, non_blocking=True) for t in self))
