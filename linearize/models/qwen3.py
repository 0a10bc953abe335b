"""Qwen3: per-head RMSNorm on q and k (``q_norm``/``k_norm``, applied before RoPE, kept as is)."""

from transformers import Qwen3Config, Qwen3ForCausalLM
from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

from .base import ArchAdapter, register_adapter

ADAPTER = register_adapter(ArchAdapter("qwen3", Qwen3Config, Qwen3ForCausalLM, apply_rotary_pos_emb))
