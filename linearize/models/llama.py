"""Llama (and SmolLM2): full attention in every layer."""

from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .base import ArchAdapter, register_adapter

ADAPTER = register_adapter(ArchAdapter("llama", LlamaConfig, LlamaForCausalLM, apply_rotary_pos_emb))
