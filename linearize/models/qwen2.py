"""Qwen2 / Qwen2.5: q/k/v biases; layers marked ``sliding_attention`` keep softmax by default."""

from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from .base import ArchAdapter, register_adapter

ADAPTER = register_adapter(ArchAdapter("qwen2", Qwen2Config, Qwen2ForCausalLM, apply_rotary_pos_emb))
