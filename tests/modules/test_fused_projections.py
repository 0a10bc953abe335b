"""CompiledDecode(fuse_projections=True): one GEMM for q/k/v and one for gate/up, equal to the plain step."""

import pytest
import torch
from torch import nn
from transformers import DynamicCache, StaticCache

import linearize
from linearize import CompiledDecode, LinearizeConfig
from linearize.modules.fused_projections import FusedProjections
from tests.decode_steps import greedy_steps_and_full_forward
from tests.tiny_models import perturb_added_weights, tiny_model


def _model(arch, **cfg):
    model = linearize.convert(tiny_model(arch), LinearizeConfig(**({"feature_dim": 6, "window": 4} | cfg)))
    perturb_added_weights(model)
    return model


def _run(model, step, kept: bool, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, P = 3, 9
    ids = torch.randint(3, 96, (B, P), generator=g)
    mask = torch.ones(B, P, dtype=torch.long)
    mask[1, :3] = 0
    cache = StaticCache(config=model.config, max_cache_len=P + n + 2) if kept else DynamicCache(config=model.config)
    return greedy_steps_and_full_forward(model, step, cache, ids, mask, n, pass_mask=kept)


@pytest.mark.parametrize(
    "arch,cfg,want",
    [("llama", {}, (3, 3)), ("qwen2", {"softmax_layers": [1]}, (2, 3)),
     ("gemma3_text", {"convert_sliding_layers": True, "feature_rope": False}, (3, 3))],
    ids=["llama", "qwen2-bias-kept-1", "gemma3"],
)
def test_fused_step_equals_the_full_forward(arch, cfg, want):
    """Eager steps through the fused projections (q/k/v biases in qwen2, gelu in Gemma's MLP; a kept softmax
    layer keeps its own q/k/v but gets the fused MLP), equal to the full forward; between steps the modules
    are as they were but for their weights' storage (the same Parameter objects and values, as views of the
    fused tensors), and ``close()`` gives them their own storage back."""
    model = _model(arch, **cfg)
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    step = CompiledDecode(model, kernel=False, compile=False, fuse_projections=True)
    assert step.fused.fused_layers == want
    got, ref = _run(model, step, kept=bool(cfg.get("softmax_layers")))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    for layer in model.base_model.layers:
        assert "forward" not in vars(layer.mlp) and not hasattr(layer.mlp, "_linearize_gate_up")
        assert getattr(layer.self_attn, "fused_qkv", None) is None
    attn, mlp = model.base_model.layers[0].self_attn, model.base_model.layers[0].mlp
    shared = {p.untyped_storage().data_ptr() for p in (mlp.gate_proj.weight, mlp.up_proj.weight)}
    assert len(shared) == 1
    if want[0] == 3:
        assert len({m.weight.untyped_storage().data_ptr() for m in (attn.q_proj, attn.k_proj, attn.v_proj)}) == 1
    step.close()
    storages = [p.untyped_storage().data_ptr() for p in model.parameters()]
    assert len(set(storages)) == len(storages)  # (no tied weights in the tiny models)
    for n, p in model.named_parameters():
        assert p is before[n][0] and torch.equal(p, before[n][1]), n


def test_compiled_fused_step_has_fewer_gemms_and_no_recompile():
    """Under inductor: equal to the full forward, one graph for every step, and the generated code holds 3
    fewer matrix products a layer than the plain step's."""
    import re

    from torch._inductor.utils import run_and_get_code

    model = _model("llama")
    counts = {}
    for fuse in (False, True):
        torch._dynamo.reset()
        step = CompiledDecode(model, kernel=False, fuse_projections=fuse)
        codes = []

        def recording(*a, step=step, codes=codes):
            if codes:  # the first step's code is the graph every step runs
                return step(*a)
            out, code = run_and_get_code(lambda: step(*a))
            codes.extend(code)
            return out

        got, ref = _run(model, recording, kept=False, n=3)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        counts[fuse] = len(re.findall(r"extern_kernels\.(?:mm|addmm)\(", "\n".join(codes)))
    layers = model.config.num_hidden_layers
    assert counts[False] - counts[True] == 3 * layers, counts


def test_fused_weights_follow_updates_and_replacements():
    """An optimizer step on the (now view) parameters reaches the fused tensors; a parameter given a new
    tensor (as ``model.to`` does) is moved again on the next step. Both still equal the full forward."""
    model = _model("llama")
    step = CompiledDecode(model, kernel=False, compile=False, fuse_projections=True)
    _run(model, step, kept=False, n=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss = model(torch.randint(3, 96, (2, 7))).logits.square().mean()
    loss.backward()
    opt.step()
    got, ref = _run(model, step, kept=False, n=3, seed=1)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        for layer in model.base_model.layers:
            layer.self_attn.k_proj.weight.data = layer.self_attn.k_proj.weight.data * 1.5
            layer.mlp.up_proj.weight.data = layer.mlp.up_proj.weight.data + 0.01
    got, ref = _run(model, step, kept=False, n=3, seed=2)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    model.base_model.layers[0].mlp.up_proj.double()  # one tensor cannot hold two dtypes: that MLP leaves the fusion
    step.fused.refresh()
    n = model.config.num_hidden_layers
    assert step.fused.fused_layers == (n, n - 1) and model.base_model.layers[0].mlp.gate_proj.weight.dtype == torch.float32


def test_projections_wrapped_after_the_fusion_run_as_wrapped():
    """peft's LoRA put on q/k/v/o after the step fused them: the wrapped layers leave the fusion (their
    adapters run, with their own storage back), and the step equals the full forward of the wrapped model."""
    from peft import LoraConfig, get_peft_model

    model = _model("llama")
    step = CompiledDecode(model, kernel=False, compile=False, fuse_projections=True)
    _run(model, step, kept=False, n=2)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False))
    got, ref = _run(peft_model.base_model.model, step, kept=False, n=3, seed=1)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert step.fused.fused_layers == (0, model.config.num_hidden_layers)
    attn = model.base_model.layers[0].self_attn
    ptrs = {m.base_layer.weight.untyped_storage().data_ptr() for m in (attn.q_proj, attn.k_proj, attn.v_proj)}
    assert len(ptrs) == 3


def test_save_pretrained_while_fused_round_trips(tmp_path):
    """transformers' save_pretrained writes the view parameters apart; the reloaded model equals the live one."""
    model = _model("llama")
    step = CompiledDecode(model, kernel=False, compile=False, fuse_projections=True)
    _run(model, step, kept=False, n=2)
    model.save_pretrained(tmp_path)
    back = type(model).from_pretrained(tmp_path)
    ids = torch.randint(3, 96, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_wrapped_projections_and_other_mlps_are_left_alone():
    """A wrapped q_proj (as peft's LoRA layer) keeps its layer's q/k/v unfused; an MLP whose forward is not
    down(act(gate(x)) * up(x)) keeps its forward."""

    class Wrapped(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.out_features = inner, inner.out_features

        def forward(self, x):
            return self.inner(x)

    class Swapped(nn.Module):  # the MLP with gate and up exchanged
        def __init__(self, mlp):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj, self.act_fn = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn

        def forward(self, x):
            return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))

    model = _model("llama")
    layers = model.base_model.layers
    layers[0].self_attn.q_proj = Wrapped(layers[0].self_attn.q_proj)
    layers[1].mlp = Swapped(layers[1].mlp)
    layers[2].self_attn.v_proj.double()  # one tensor cannot hold two dtypes: that layer keeps its q/k/v
    fused = FusedProjections(model)
    n = model.config.num_hidden_layers
    assert fused.fused_layers == (n - 2, n - 1)
    assert layers[0].self_attn not in [a for a, _ in fused.attn] and layers[1].mlp not in [m for m, _ in fused.mlps]
    assert layers[2].self_attn.v_proj.weight.dtype == torch.float64
    assert len(fused._fused) == 2 * n - 3  # nothing held for what is not fused
    layers[2].self_attn.v_proj.float()
    swapped = layers[1].mlp  # its weights got their own storage back when its check failed
    assert swapped.gate_proj.weight.untyped_storage().data_ptr() != swapped.up_proj.weight.untyped_storage().data_ptr()
    fused.release()
    step = CompiledDecode(model, kernel=False, compile=False, fuse_projections=True)
    got, ref = _run(model, step, kept=False)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_default_is_off_on_cpu():
    """The default (None) fuses only on CUDA, where it was measured faster (tests/gpu checks it is on there)."""
    from linearize.decode import fuse_projections_default

    model = _model("llama")
    assert not fuse_projections_default(model)
    assert CompiledDecode(model, kernel=False, compile=False).fused is None
    assert CompiledDecode(model, kernel=False, compile=False, fuse_projections=True).fused is not None
