"""linearize: turn pretrained Transformer LLMs into hybrid linear-attention LLMs (LoLCATs).

    import linearize
    model, tok = linearize.models.load("smollm2-135m")
    model = linearize.convert(model, linearize.LinearizeConfig(window=64))

Importing the package registers ``Linearized<Arch>`` classes with transformers' Auto classes, so a
saved linearized model loads back with ``AutoModelForCausalLM.from_pretrained``.
"""

from . import models, ops
from .config import LinearizeConfig
from .convert import convert, is_linearized, linearized_layers
from .decode import CompiledDecode
from .modules.attention import LinearizedAttention

__version__ = "0.1.0"
__all__ = ["CompiledDecode", "LinearizeConfig", "LinearizedAttention", "convert", "is_linearized", "linearized_layers", "models", "ops"]
