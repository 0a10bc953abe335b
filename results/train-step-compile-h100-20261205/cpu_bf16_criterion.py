"""The GPU compile test's criterion on CPU under bf16 autocast: how far the compiled and eager bf16 steps each are
from the fp32 step (PyTorch chunked path, inductor's CPU backend)."""
import torch, time
import linearize
from linearize.pipelines import finetune, transfer
from tests.ops.helpers import rel_err
from tests.tiny_models import perturb_added_weights, tiny_model
from tests.pipelines.compile_helpers import eager_and_compiled, stage_setup

bf16 = lambda device: torch.autocast("cpu", dtype=torch.bfloat16)
fp32 = lambda device: torch.autocast("cpu", enabled=False)
for stage in (1, 2):
    t0 = time.time()
    torch.manual_seed(0)
    model = tiny_model("llama", hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                       intermediate_size=512, num_hidden_layers=3)
    model = linearize.convert(model, linearize.LinearizeConfig(window=64, feature_dim=64))
    perturb_added_weights(model)
    ids = torch.randint(3, 96, (2, 300))
    setup = stage_setup(model, stage)
    transfer.autocast = finetune.autocast = bf16
    (l0, g0), (l1, g1) = eager_and_compiled(*setup, ids)
    transfer.autocast = finetune.autocast = fp32
    model, params, loss_fn = setup
    model.zero_grad()
    l32 = loss_fn(model, ids); l32.backward()
    g32 = {n: p.grad.clone() for n, p in params.items()}
    worst = []
    for name, c, e, r in [("loss", l1, l0, l32.detach()), *((n, g1[n], g0[n], g32[n]) for n in g0)]:
        err, base, ce = rel_err(c, r), rel_err(e, r), rel_err(c, e)
        worst.append((err / max(base, 1e-2), name, err, base, ce))
    worst.sort(reverse=True)
    print(f"stage {stage} ({time.time()-t0:.0f} s): worst compiled/max(eager,1e-2) ratios:")
    for w in worst[:4]:
        print(f"  {w[1]:60s} compiled-fp32 {w[2]:.2e}  eager-fp32 {w[3]:.2e}  compiled-eager {w[4]:.2e}  ratio {w[0]:.2f}")
