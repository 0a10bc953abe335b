"""``lora.layers``: which decoder layers get stage-2 adapters (all, only the linearized ones, or a list)."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import linearize
from linearize.pipelines.config import LoraConfig, build_config
from linearize.pipelines.finetune import add_lora
from linearize.pipelines.run import run_conversion

from ..tiny_models import tiny_model
from .tiny_run import make_model_dir, make_text, tiny_overrides


pytestmark = pytest.mark.usefixtures("own_cache")


def _adapted_layers(peft_model) -> set[int]:
    return {int(n.split(".layers.")[1].split(".")[0]) for n, p in peft_model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("layers,want", [("all", {0, 1, 2, 3}), ("linearized", {0, 2}), ([3, 1], {1, 3})])
def test_adapters_go_only_to_the_layers_named(layers, want):
    model = tiny_model("llama", num_hidden_layers=4)
    linearize.convert(model, linearize.LinearizeConfig(feature_dim=4, window=4, softmax_layers=[1, 3]))
    for p in model.parameters():
        p.requires_grad_(False)
    peft_model = add_lora(model, LoraConfig(layers=layers))
    assert _adapted_layers(peft_model) == want
    names = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert {n.split(".")[-4] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj"}


@pytest.mark.parametrize("value,match", [("some", "lora.layers"), ([], "lora.layers"), ([-1], "lora.layers")])
def test_bad_lora_layers_are_one_line_errors(value, match):
    with pytest.raises(ValueError, match=match) as e:
        build_config(None, None, [f"lora.layers={value}"])
    assert "\n" not in str(e.value)


def test_linearized_lora_layers_need_a_conversion_and_indices_in_range():
    with pytest.raises(ValueError, match="no linearized layers"):
        build_config(None, None, ["convert=false", "stage1.steps=0", "lora.layers=linearized"])
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="out of range"):
        add_lora(model, LoraConfig(layers=[0, 7]))
    with pytest.raises(ValueError, match="no linearized layer"):
        add_lora(model, LoraConfig(layers="linearized"))


def test_run_with_lora_on_the_linearized_layers_leaves_the_kept_layer_exact(tmp_path):
    """A run with layer 0 kept softmax and ``lora.layers=linearized``: the exported model's layer-0 projections
    are the base's bit for bit, layer 1's moved (the merged adapters)."""
    model_dir, text = make_model_dir(tmp_path / "tiny"), make_text(tmp_path / "text.txt")
    over = tiny_overrides(text, steps1=2, steps2=4) + ["linearize.softmax_layers=[0]", "lora.layers=linearized"]
    run_conversion(build_config(None, None, over, model=str(model_dir)), tmp_path / "run", echo=lambda m: None)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    base = load_file(model_dir / "model.safetensors")
    new = {n: p.detach() for n, p in exported.named_parameters()}
    proj = [n for n in base if n.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj")]
    moved = {n for n in proj if not torch.equal(base[n], new[n])}
    assert moved and all(".layers.1." in n for n in moved)
    assert all(torch.equal(base[n], new[n]) for n in proj if ".layers.0." in n)
