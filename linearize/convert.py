"""``convert``: swap a model's softmax attention layers for ``LinearizedAttention``, in place."""

from __future__ import annotations

import torch
import torch.nn as nn

from safetensors import SafetensorError
from transformers.cache_utils import Cache, StaticLayer

from .config import LinearizeConfig
from .modules.attention import PADDING_MASK_KWARG, LinearizedAttention


#: parameter-name parts that only conversion adds (feature maps, window weights, length exponents, sink u/c)
_ADDED_PARAM_MARKERS = {"feature_map_q", "feature_map_k", "window_logit", "length_alpha", "sink_u", "sink_c"}


class CheckpointError(ValueError):
    """A linearized checkpoint that cannot be loaded as saved."""


def convert(model: nn.Module, config: LinearizeConfig | dict | None = None) -> nn.Module:
    """Linearize ``model`` (an HF ``*ForCausalLM``) in place and return it.

    Every selected decoder layer's attention becomes a ``LinearizedAttention`` that reuses the layer's
    projections. The model becomes a ``Linearized<Arch>ForCausalLM`` whose config records the settings,
    so ``save_pretrained`` / ``AutoModelForCausalLM.from_pretrained`` round-trip it.
    """
    from .models import adapter_for

    if config is None:
        config = LinearizeConfig()
    elif isinstance(config, dict):
        config = LinearizeConfig.from_dict(config)
    elif not isinstance(config, LinearizeConfig):
        raise TypeError(f"config must be a LinearizeConfig or a dict; got {type(config).__name__}")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise TypeError(f"convert expects a transformers model with a config; got {type(model).__name__}")
    if is_linearized(model):
        raise ValueError("this model is already linearized")
    adapter = adapter_for(model_type)
    if not isinstance(model, adapter.causal_lm_class):
        raise TypeError(f"convert expects a {adapter.causal_lm_class.__name__}; got {type(model).__name__}")
    if getattr(model, "hf_quantizer", None) is not None:
        raise ValueError("the model is quantized; load it in bf16/fp32 (linearize.models.load does) before converting")

    converted = convert_layers(model, adapter, config)
    record = config.to_dict() | {"layers": converted}
    model.config.__class__ = adapter.linearized_config_class
    model.config.linearize = record
    model.__class__ = adapter.linearized_model_class
    return model


def selected_layers(model: nn.Module, adapter, config: LinearizeConfig) -> list[int]:
    """The decoder-layer indices ``config`` selects for conversion (sorted): ``layers`` (default: every
    layer but the model's own sliding-window ones, unless ``convert_sliding_layers``) minus ``softmax_layers``."""
    layers = adapter.decoder_layers(model)
    n = len(layers)
    for name in ("layers", "softmax_layers"):
        bad = [i for i in (getattr(config, name) or []) if i >= n]
        if bad:
            raise ValueError(f"LinearizeConfig.{name} has indices {bad} but the model has {n} layers (0..{n - 1})")
    explicit = config.layers is not None
    whole = _wholly_kept(model, config)
    wanted = sorted(set(config.layers if explicit else range(n)) - set(config.softmax_layers) - whole)
    selected = [i for i in wanted if explicit or config.convert_sliding_layers or not adapter.is_sliding_layer(layers[i].self_attn)]
    stray = sorted({i for i, _ in config.softmax_heads} - set(selected) - whole - set(config.softmax_layers))
    if stray:
        raise ValueError(f"LinearizeConfig.softmax_heads names heads of layers {stray}, which this conversion does not "
                         f"linearize (converted: {selected}); drop them, they are softmax already")
    return selected


def _wholly_kept(model: nn.Module, config: LinearizeConfig) -> set[int]:
    """Layers whose every KV head ``softmax_heads`` lists: kept softmax whole. Checks the head indices."""
    Hkv = getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads
    bad = [p for p in config.softmax_heads if p[1] >= Hkv]
    if bad:
        raise ValueError(f"LinearizeConfig.softmax_heads has {bad}: the model has {Hkv} KV heads a layer (0..{Hkv - 1})")
    return {i for i, _ in config.softmax_heads if len(config.kept_heads(i)) == Hkv}


def convert_layers(model: nn.Module, adapter, config: LinearizeConfig) -> list[int]:
    """Replace the selected layers' attention; return the converted indices (sorted)."""
    layers = adapter.decoder_layers(model)
    converted = selected_layers(model, adapter, config)
    for i in converted:
        attn = layers[i].self_attn
        layers[i].self_attn = LinearizedAttention(
            attn, config, apply_rope=adapter.rope, rope_rotate_half=adapter.rope_rotate_half, teacher_sliding_window=adapter.teacher_sliding_window(attn),
            kept_kv_heads=config.kept_heads(i),
        )
    if not converted:
        raise ValueError("no layer was selected for conversion; check LinearizeConfig.layers / softmax_layers")
    _install_padding_hook(model.base_model)
    # the layers kept softmax, for the hook's static-cache check (computed here, not on every forward)
    model.base_model._linearize_kept = tuple(i for i, layer in enumerate(layers) if not isinstance(layer.self_attn, LinearizedAttention))
    return converted


def kept_softmax_layers(model: nn.Module) -> tuple[int, ...]:
    """Indices of the decoder layers a linearized model keeps as softmax attention (() for any other model)."""
    return getattr(model.base_model, "_linearize_kept", ())


def _install_padding_hook(base_model: nn.Module) -> None:
    """Pass the 2D padding mask to every layer: HF hands attention layers only a 4D (or no) mask."""
    if getattr(base_model, "_linearize_padding_hook", None) is None:
        base_model._linearize_padding_hook = base_model.register_forward_pre_hook(_pass_padding_mask, with_kwargs=True)


def _pass_padding_mask(module, args, kwargs):
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    if torch.is_tensor(mask) and mask.dim() == 2:
        kwargs[PADDING_MASK_KWARG] = mask
    x = kwargs.get("input_ids", args[0] if args else None)
    x = x if x is not None else kwargs.get("inputs_embeds")
    one_token = torch.is_tensor(x) and x.dim() >= 2 and x.shape[1] == 1
    if one_token and not (torch.is_tensor(mask) and mask.dim() == 4):  # a 4D mask is used as given (CompiledDecode's)
        _refuse_static_softmax_layers(module, kwargs.get("cache", kwargs.get("past_key_values")))
    return args, kwargs


def _refuse_static_softmax_layers(base_model: nn.Module, cache) -> None:
    """A kept softmax layer on a fixed-size (static) cache layer decodes wrong beside our layers: transformers
    builds the one-token decode mask only when *every* cache layer is compileable, and ours are not, so SDPA
    would read the static cache's empty slots (measured: 6e-2 off the full forward). A prefill's mask is built
    (it is longer than one token). Refuse rather than be wrong."""
    if not isinstance(cache, Cache):
        return
    for i in getattr(base_model, "_linearize_kept", ()):  # (the hook sits on base_model: kept_softmax_layers' store)
        if i < len(cache.layers) and isinstance(cache.layers[i], StaticLayer):
            raise ValueError(
                f"layer {i} is kept softmax and its cache layer is static ({type(cache.layers[i]).__name__}): this model "
                "keeps softmax layers, so decode it with a dynamic cache (generate's default; not cache_implementation='static') "
                "or with linearize.CompiledDecode"
            )


def is_linearized(model: nn.Module) -> bool:
    return any(isinstance(m, LinearizedAttention) for m in model.modules())


def linearized_layers(model: nn.Module) -> list[LinearizedAttention]:
    return [m for m in model.modules() if isinstance(m, LinearizedAttention)]


class LinearizedMixin:
    """Base of every ``Linearized<Arch>ForCausalLM``: rebuilds the hybrid layers from the config."""

    adapter = None  # set per class by models.base.register_adapter

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        settings = getattr(config, "linearize", None)
        if not isinstance(settings, dict):
            raise ValueError(f"{type(self).__name__} needs config.linearize (a dict of LinearizeConfig settings)")
        convert_layers(self, self.adapter, LinearizeConfig.from_dict(settings))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' loader, plus one-line errors for a corrupt or incomplete linearized checkpoint."""
        from .models.hub import NO_HUB_KERNELS

        want_info = kwargs.pop("output_loading_info", False)
        kwargs = NO_HUB_KERNELS | kwargs
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        except SafetensorError as e:
            raise CheckpointError(
                f"corrupt checkpoint {pretrained_model_name_or_path}: its safetensors cannot be read "
                f"({str(e).splitlines()[0]}); save it again with save_pretrained"
            ) from None
        missing = [k for k in info.get("missing_keys", ()) if _ADDED_PARAM_MARKERS.intersection(k.split("."))]
        if missing:
            raise CheckpointError(
                f"incomplete checkpoint {pretrained_model_name_or_path}: {len(missing)} linearized weights are "
                f"missing (e.g. {sorted(missing)[0]}); it was not saved from a linearized model"
            )
        return (model, info) if want_info else model

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, LinearizedAttention):
            module.reset_parameters()
