"""Mistral. Its optional ``sliding_window`` applies to every layer, so every layer is converted (as
LoLCATs did); the teacher keeps the sliding window."""

from transformers import MistralConfig, MistralForCausalLM
from transformers.models.mistral.modeling_mistral import apply_rotary_pos_emb

from .base import ArchAdapter, register_adapter

ADAPTER = register_adapter(
    ArchAdapter(
        "mistral",
        MistralConfig,
        MistralForCausalLM,
        apply_rotary_pos_emb,
        teacher_sliding_window=lambda attn: getattr(attn.config, "sliding_window", None),
        is_sliding_layer=lambda attn: False,
    )
)
