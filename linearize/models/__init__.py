"""Architecture adapters (one thin file each) and model loading (``load``)."""

from . import gemma3, llama, mistral, qwen2, qwen3  # noqa: F401  (registers the adapters)
from .base import ADAPTERS, ArchAdapter, adapter_for, cache_kwarg

SUPPORTED_ARCHITECTURES = tuple(sorted(ADAPTERS))


def load(name_or_path, **kwargs):
    """Load ``(model, tokenizer)`` from an alias, a ``.gguf`` file, a local HF dir or a hub id. See ``hub.load``."""
    from .hub import load as _load

    return _load(name_or_path, **kwargs)


__all__ = ["ADAPTERS", "ArchAdapter", "SUPPORTED_ARCHITECTURES", "adapter_for", "cache_kwarg", "load"]
