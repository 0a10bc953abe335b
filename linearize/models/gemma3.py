"""Gemma 3 (text): q/k norms, ``query_pre_attn_scalar`` scaling, and 5 local : 1 global layers.

Decision: only the global (full-attention) layers are converted by default. The local layers already
attend to a bounded window (512 tokens for the 270M model) with a bounded KV cache, so they cost
O(T * 512) and constant decode memory as they are; linearizing them would add a linear part over keys
their teacher never saw. ``LinearizeConfig(convert_sliding_layers=True)`` converts them too, with the
hybrid's own window. RoPE follows each layer: local layers get the local base, global the global one.
"""

from transformers import Gemma3ForCausalLM, Gemma3TextConfig
from transformers.models.gemma3.modeling_gemma3 import apply_rotary_pos_emb

from .base import ArchAdapter, register_adapter

ADAPTER = register_adapter(ArchAdapter("gemma3_text", Gemma3TextConfig, Gemma3ForCausalLM, apply_rotary_pos_emb))
