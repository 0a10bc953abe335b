"""What an architecture adapter says, and the linearized model classes made from it.

An adapter is a handful of facts about one HF architecture: its classes, its RoPE function, where its
decoder layers are, and which of its layers are already sliding-window. From it we derive
``Linearized<Arch>Config`` / ``Linearized<Arch>ForCausalLM`` and register them with the Auto classes,
so ``AutoModelForCausalLM.from_pretrained(dir)`` rebuilds a saved linearized model after
``import linearize``. No modeling code is copied: the classes subclass transformers' own.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn
from transformers import AutoConfig, AutoModelForCausalLM

ADAPTERS: dict[str, "ArchAdapter"] = {}


@functools.cache
def cache_kwarg() -> str:
    """The keyword a causal LM's forward takes its cache by: ``cache`` since transformers 5.24, where
    ``past_key_values`` is deprecated (removed in 5.40); ``past_key_values`` before."""
    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


@dataclass
class ArchAdapter:
    model_type: str
    config_class: type
    causal_lm_class: type
    rope: Callable  # the modeling module's apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)
    #: whether ``rope`` is transformers' rotate-half RoPE over the whole head dim (x cos + rotate_half(x) sin), which
    #: a compiled decode step may compute inside its map kernel (``rope_hedgehog_pair_triton``)
    rope_rotate_half: bool = True
    #: the softmax teacher's sliding window for a layer's attention module (None = full attention)
    teacher_sliding_window: Callable[[nn.Module], int | None] = lambda attn: getattr(attn, "sliding_window", None)
    #: whether a layer is an (already cheap) sliding-window layer, kept as softmax by default
    is_sliding_layer: Callable[[nn.Module], bool] = lambda attn: getattr(attn, "sliding_window", None) is not None
    linearized_config_class: type = field(init=False)
    linearized_model_class: type = field(init=False)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.base_model.layers


def register_adapter(adapter: ArchAdapter) -> ArchAdapter:
    """Make and register the Linearized config/model classes of ``adapter``."""
    from ..convert import LinearizedMixin

    name = adapter.causal_lm_class.__name__
    cfg_cls = type(
        f"Linearized{adapter.config_class.__name__}",
        (adapter.config_class,),
        {"model_type": f"linearized_{adapter.model_type}", "__module__": __name__},
    )
    model_cls = type(
        f"Linearized{name}",
        (LinearizedMixin, adapter.causal_lm_class),
        {"config_class": cfg_cls, "adapter": adapter, "__module__": __name__},
    )
    adapter.linearized_config_class, adapter.linearized_model_class = cfg_cls, model_cls
    AutoConfig.register(cfg_cls.model_type, cfg_cls, exist_ok=True)
    AutoModelForCausalLM.register(cfg_cls, model_cls, exist_ok=True)
    globals()[cfg_cls.__name__] = cfg_cls  # importable by name, for pickling and error messages
    globals()[model_cls.__name__] = model_cls
    ADAPTERS[adapter.model_type] = adapter
    return adapter


def adapter_for(model_type: str) -> ArchAdapter:
    base_type = model_type.removeprefix("linearized_")
    if base_type not in ADAPTERS:
        raise ValueError(f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[base_type]
