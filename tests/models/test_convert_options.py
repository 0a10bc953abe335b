"""Which layers get converted, and the errors users see."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import linearize
from linearize import LinearizeConfig, LinearizedAttention
from linearize.convert import CheckpointError

from ..tiny_models import cache_kw, tiny_model


def converted_indices(model):
    return [i for i, layer in enumerate(model.model.layers) if isinstance(layer.self_attn, LinearizedAttention)]


def test_gemma3_keeps_sliding_layers_by_default():
    model = linearize.convert(tiny_model("gemma3_text"))
    assert converted_indices(model) == [1]
    assert model.config.linearize["layers"] == [1]


def test_gemma3_can_convert_sliding_layers():
    model = linearize.convert(tiny_model("gemma3_text"), LinearizeConfig(convert_sliding_layers=True))
    assert converted_indices(model) == [0, 1, 2]
    assert linearize.linearized_layers(model)[0].sliding_window == 6  # the teacher keeps its window


def test_layers_and_softmax_layers():
    model = linearize.convert(tiny_model("llama"), LinearizeConfig(layers=[0, 2], softmax_layers=[2]))
    assert converted_indices(model) == [0]
    model = linearize.convert(tiny_model("llama"), {"softmax_layers": [1]})
    assert converted_indices(model) == [0, 2]


def test_partial_conversion_decodes_like_full_forward():
    from transformers import DynamicCache

    model = linearize.convert(tiny_model("llama"), LinearizeConfig(window=2, softmax_layers=[1]))
    ids = torch.randint(3, 96, (2, 12))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, t : t + 1], **cache_kw(cache)).logits for t in range(12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)


def test_per_kv_head_key_maps_shrink_the_state():
    model = linearize.convert(tiny_model("llama"), LinearizeConfig(feature_map_per_kv_head=True, feature_dim=4))
    layer = linearize.linearized_layers(model)[0]
    assert layer.feature_map_k.num_heads == 2 and layer.feature_map_q.num_heads == 4
    with torch.no_grad():
        out = model(torch.randint(3, 96, (1, 9)))
    state = out.past_key_values.layers[0].state
    assert state.S.shape == (1, 2, 8, 8)


def test_unsupported_architecture_lists_supported():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError) as e:
        linearize.convert(gpt2)
    msg = str(e.value)
    assert "unsupported architecture 'gpt2'" in msg and "llama" in msg and "gemma3_text" in msg and "\n" not in msg


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"window": -1}, "window"),
        ({"feature_map": "cosformer"}, "feature_map"),
        ({"feature_dim": 0}, "feature_dim"),
        ({"window_weight_init": 1.5}, "window_weight_init"),
        ({"layers": [0, -2]}, "layers"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_invalid_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        LinearizeConfig(**kwargs)
    assert "\n" not in str(e.value)


def test_unknown_config_key_and_out_of_range_layer():
    with pytest.raises(ValueError, match="unknown LinearizeConfig key"):
        linearize.convert(tiny_model("llama"), {"windw": 3})
    with pytest.raises(ValueError, match="has 3 layers"):
        linearize.convert(tiny_model("llama"), LinearizeConfig(layers=[5]))


def test_converting_twice_is_refused():
    model = linearize.convert(tiny_model("qwen2"))
    with pytest.raises(ValueError, match="already linearized"):
        linearize.convert(model)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors_gives_one_line_error(tmp_path, damage):
    linearize.convert(tiny_model("llama")).save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x07" * 64, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="corrupt checkpoint") as e:
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert "\n" not in str(e.value)


def test_checkpoint_missing_linearized_weights_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    linearize.convert(tiny_model("llama")).save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    tensors = {k: v for k, v in load_file(f).items() if "feature_map" not in k}
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
