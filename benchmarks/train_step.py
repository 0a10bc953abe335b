"""Training-step throughput of the two conversion stages, and where a step's time goes.

    python benchmarks/train_step.py --model smollm2-135m --batch 8 --seq-len 1024 --out benchmarks/results/train-step

Each stage runs the pipeline's own loss functions (``transfer_loss`` for stage 1, ``stage2_loss`` through peft
LoRA for stage 2) with AdamW on random token batches (throughput does not depend on what the tokens say),
single process. Per step: CUDA-event time of forward + backward + optimizer step (median over the timed
steps after ``--warmup``), and host wall time. With ``--profile N``, N more steps run under
torch.profiler; the report gives the GPU-busy fraction (the union of kernel intervals over the wall
time: far under 1 means the step is bound by the host launching kernels, not by the GPU), kernels per
step, and the top kernels and host ops.

FLOP model (stated, not measured): a dense forward is 2 N flops per token (N = parameters in matmuls,
embeddings excluded, LM head included). Stage 2 trains adapters only, so its backward computes input
gradients (2 N per token) but no base-weight gradients: ~4 N per token plus attention. Stage 1 runs the
frozen forward once (2 N) and, per converted layer, the hybrid attention beside the softmax one; its backward
reaches only the feature maps. Attention FLOPs are left out of both (small at 1K tokens for these models),
so the achieved TFLOP/s shown are lower bounds.

``--compile both`` times each stage eagerly and with its decoder layers through torch.compile (the pipeline's
``compile=true``, ``linearize.pipelines.compile``), one row each; the first warm-up step's time (the compiles)
is reported apart. ``--kl-weight W`` trains stage 2 on W x KL to the softmax teacher + CE, as the conversions of
``results/issue6`` did (the teacher's forward is then part of the step).

``--map-kernel both`` times each stage twice in the same run, the layers' Hedgehog maps through the Triton map
kernel (one launch for a layer's two maps, forward and backward; the default on CUDA) and through the maps'
modules (``HedgehogFeatureMap.kernel = False``), one row each.

Writes OUT/train_step.json and OUT/train_step.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `linearize` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

import torch  # noqa: E402

from benchmarks.random_model import random_model  # noqa: E402


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that enter matmuls per token: every Linear's weight (the LM head included)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def build(model_name: str, stage: int, device: torch.device, dtype: torch.dtype, lin_cfg: dict, kl_weight: float = 0.0,
          compiled: bool = False):
    """The model as the pipeline trains it in ``stage``, its trainable parameters, and the loss function."""
    from linearize import LinearizeConfig, convert
    from linearize.models import load
    from linearize.pipelines.config import LoraConfig, Stage2LossConfig
    from linearize.pipelines.finetune import add_lora, lora_parameters, stage2_loss
    from linearize.pipelines.transfer import freeze_for_transfer, set_mode, transfer_loss

    if model_name.endswith(".json"):  # the architecture alone, random weights: timing needs no checkpoint
        model = random_model(model_name, dtype)
    else:
        model, _ = load(model_name, dtype=dtype)
    model.to(device)
    n_matmul = matmul_params(model)
    convert(model, LinearizeConfig(**lin_cfg))
    model.to(device)
    if stage == 1:
        params = freeze_for_transfer(model)
        return model, params, transfer_loss, n_matmul
    for p in model.parameters():
        p.requires_grad_(False)
    set_mode(model, "hybrid")
    peft_model = add_lora(model, LoraConfig())
    return peft_model, lora_parameters(peft_model), stage2_loss(Stage2LossConfig(kl_weight=kl_weight), compiled), n_matmul


def gpu_busy(prof, wall_s: float) -> tuple[float, int, list[dict], list[dict]]:
    """(union of kernel intervals / wall, kernels, top kernels, top host ops) from a finished profiler."""
    from linearize.pipelines.profiling import gpu_busy as busy_fraction, top_ops

    busy, n_kernels = busy_fraction(prof, wall_s)
    rename = lambda rows: [{"name": r["name"][:90], "calls": r["calls"], "ms_total": r["ms"]} for r in rows]  # noqa: E731
    return (busy, n_kernels, rename(top_ops(prof, "self_device_time_total", 15)),
            rename(top_ops(prof, "self_cpu_time_total", 15)))


def run_stage(args, stage: int, device: torch.device, compiled: bool = False) -> dict:
    from linearize.pipelines.compile import compiled_layers

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, params, loss_fn, n_matmul = build(args.model, stage, device, dtype, json.loads(args.linearize), args.kl_weight,
                                             compiled)
    with compiled_layers(model, compiled):
        out = _time_stage(args, stage, device, model, params, loss_fn, n_matmul) | {"compiled": compiled}
    del model, params, loss_fn
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return out


def _time_stage(args, stage: int, device: torch.device, model, params, loss_fn, n_matmul: int) -> dict:
    vocab = model.config.vocab_size
    opt = torch.optim.AdamW(list(params.values()), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (args.batch, args.seq_len), generator=g).to(device) for _ in range(4)]
    model.train()

    def step(i: int) -> None:
        loss = loss_fn(model, batches[i % len(batches)])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    first_s = None
    for i in range(args.warmup):
        t0 = time.perf_counter()
        step(i)
        sync()
        first_s = first_s if first_s is not None else time.perf_counter() - t0
    sync()
    gpu_ms, wall_ms = [], []
    for i in range(args.steps):
        t0 = time.perf_counter()
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step(i)
            b.record()
            b.synchronize()
            gpu_ms.append(a.elapsed_time(b))
        else:
            step(i)
        wall_ms.append((time.perf_counter() - t0) * 1e3)
    tokens = args.batch * args.seq_len
    med = statistics.median(gpu_ms or wall_ms)
    per_token = 4 * n_matmul if stage == 2 else 2 * n_matmul
    out = {
        "stage": stage, "batch": args.batch, "seq_len": args.seq_len, "tokens_per_step": tokens,
        "trainable_params": sum(p.numel() for p in params.values()), "matmul_params": n_matmul,
        "step_ms_median": med, "step_ms_min": min(gpu_ms or wall_ms), "wall_ms_median": statistics.median(wall_ms),
        "tokens_per_s": tokens / med * 1e3, "flop_model_per_token": per_token, "first_step_s": first_s,
        "tflops_lower_bound": per_token * tokens / med / 1e9,
        "peak_mem_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
    }
    if args.profile > 0:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        sync()
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            for i in range(args.profile):
                step(i)
            sync()
            wall = time.perf_counter() - t0
        busy, n_kernels, top_k, top_h = gpu_busy(prof, wall)
        out["profile"] = {"steps": args.profile, "wall_ms_per_step": wall / args.profile * 1e3,
                          "gpu_busy_fraction": busy if device.type == "cuda" else None,
                          "kernels_per_step": n_kernels / args.profile, "top_kernels": top_k, "top_host_ops": top_h}
    return out


def markdown(summary: dict) -> str:
    lines = [f"# Training step, {summary['model']}", "",
             f"Device {summary['device']}; torch {summary['torch']}; batch {summary['batch']} x {summary['seq_len']} tokens; "
             f"linearize config {summary['linearize']}; stage-2 KL weight {summary.get('kl_weight', 0.0)}; median of "
             f"{summary['steps']} steps after {summary['warmup']} warm-up (the first warm-up step's time apart: compiles).", "",
             "| stage | maps | layers | first step s | step ms (median) | host wall ms | tokens/s | TFLOP/s (lower bound) "
             "| GPU busy | kernels/step | peak MiB |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary["stages"]:
        p = r.get("profile", {})
        busy = p.get("gpu_busy_fraction")
        maps = "map kernel" if r.get("map_kernel", True) else "modules"
        first = "–" if r.get("first_step_s") is None else f"{r['first_step_s']:.1f}"
        layers = "compiled" if r.get("compiled") else "eager"
        lines.append(f"| {r['stage']} | {maps} | {layers} | {first} | {r['step_ms_median']:.1f} | {r['wall_ms_median']:.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tflops_lower_bound']:.1f} | {'–' if busy is None else f'{100 * busy:.0f}%'} | "
                     f"{p.get('kernels_per_step', 0):.0f} | {r['peak_mem_mib'] or 0:,.0f} |")
    for r in summary["stages"]:
        if "profile" not in r:
            continue
        maps = ("" if r.get("map_kernel", True) else ", maps through the modules") + (", compiled layers" if r.get("compiled") else "")
        lines += ["", f"## Stage {r['stage']}{maps}: top kernels ({r['profile']['steps']} profiled steps)", "", "| kernel | calls | ms |", "|---|---:|---:|"]
        lines += [f"| `{k['name']}` | {k['calls']} | {k['ms_total']:.2f} |" for k in r["profile"]["top_kernels"]]
        lines += ["", f"## Stage {r['stage']}{maps}: top host ops", "", "| op | calls | self ms |", "|---|---:|---:|"]
        lines += [f"| `{k['name']}` | {k['calls']} | {k['ms_total']:.2f} |" for k in r["profile"]["top_host_ops"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m",
                    help="alias, .gguf, HF dir or hub id; or a config.json (random weights, e.g. benchmarks/configs/smollm2-135m.json)")
    ap.add_argument("--stages", default="1,2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--profile", type=int, default=3, help="steps under torch.profiler (0: none)")
    ap.add_argument("--linearize", default="{}", help="LinearizeConfig fields as JSON")
    ap.add_argument("--map-kernel", choices=["on", "off", "both"], default="on",
                    help="Hedgehog maps through the Triton map kernel (on), the modules (off), or each stage both ways")
    ap.add_argument("--compile", choices=["on", "off", "both"], default="off",
                    help="decoder layers through torch.compile (on), eager (off), or each stage both ways")
    ap.add_argument("--kl-weight", type=float, default=0.0, help="stage 2: KL-to-teacher weight beside CE (0: CE only)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
    device = torch.device(args.device)
    from linearize.modules.feature_maps import HedgehogFeatureMap

    stages, default = [], HedgehogFeatureMap.kernel
    try:
        for s in args.stages.split(","):
            for kernel in {"on": [True], "off": [False], "both": [True, False]}[args.map_kernel]:
                for compiled in {"on": [True], "off": [False], "both": [False, True]}[args.compile]:
                    HedgehogFeatureMap.kernel = kernel
                    stages.append(run_stage(args, int(s), device, compiled) | {"map_kernel": kernel})
    finally:
        HedgehogFeatureMap.kernel = default
    summary = {
        "model": args.model, "batch": args.batch, "seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup,
        "linearize": args.linearize, "torch": torch.__version__, "map_kernel": args.map_kernel, "compile": args.compile,
        "kl_weight": args.kl_weight,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.machine()})",
        "stages": stages,
    }
    md = markdown(summary)
    print(md)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "train_step.json").write_text(json.dumps(summary, indent=2))
        (args.out / "train_step.md").write_text(md)
    return summary


if __name__ == "__main__":
    main()
