"""Stage-2 (LoRA) throughput on 1 GPU against N GPUs: same model, same per-GPU batch, over NCCL.

    python3 scripts/bench_distributed.py --gpus 1,2 --out results/distributed-bench-h200x2
    python3 scripts/bench_distributed.py --device cpu --model host-proxy --per-gpu-batch 1 --seq-len 64   # host overhead, CPU

Each setting is a real `linearize convert ... --nproc N` run (stage 1 skipped, stage 2 only), so what
is timed is the pipeline's own training step: forward, backward, the gradient collectives, clipping,
AdamW. The global batch is ``per_gpu_batch x N`` rows (the 1-GPU run is the plain single-process path).
Throughput is the median of the per-step ``tokens_per_s`` that rank 0 writes to metrics.jsonl (global
tokens over wall time per step), after ``--warmup`` steps. NVLink multicast stays off
(NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1). ``--placement``
(default auto: replicate where the weights take at most 10% of a GPU, else sharded) is passed to every run: ``sharded`` trains FSDP2 shards of
the whole model, ``replicate`` the whole model on every GPU with DDP (one bucketed all-reduce of the LoRA
gradients).

Writes OUT/bench.json and OUT/bench.md (and keeps each run's metrics as OUT/metrics-<N>gpu.jsonl); with
``--profile START:COUNT`` also each rank's profile of those steps, OUT/profile-<N>gpu-rank<r>.md: what the
N-GPU step spends beyond the 1-GPU one, by op, on the host and on the device.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from linearize.pipelines.profiling import parse_window  # noqa: E402

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def synthetic_text(path: Path, words: int = 400_000, seed: int = 0) -> Path:
    """Plain English-like text (throughput does not depend on what the tokens say)."""
    rnd = random.Random(seed)
    vocab = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
             "they you were her she there had been one all we their has would when if so no what up out more who").split()
    paras = [" ".join(rnd.choice(vocab) for _ in range(rnd.randint(80, 200))) + "." for _ in range(words // 140)]
    path.write_text("\n\n".join(paras))
    return path


def host_proxy_model(path: Path) -> Path:
    """SmolLM2-135M's module structure (30 layers, 9 query / 3 KV heads, LoRA on q/k/v/o) at tiny widths, random
    weights, a word-level tokenizer: its compute is negligible, so a step's time is its host overhead (dispatch,
    hooks, collectives), the regime stage 2 of a small model is in on a GPU. ``--model host-proxy`` on the CPU
    compares placements' overheads where no GPU is at hand."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    import torch

    words = ["<pad>", "<s>", "</s>", "<unk>", *sorted(set(synthetic_text(path.parent / "proxy-words.txt", 2000).read_text().split()))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=len(words), hidden_size=72, intermediate_size=96, num_hidden_layers=30,
                               num_attention_heads=9, num_key_value_heads=3, head_dim=8, max_position_embeddings=4096,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def run_one(args, n: int, source: str, work: Path, env: dict) -> dict:
    out = work / f"run-{n}gpu"
    sets = {
        "data.source": source, "data.seq_len": args.seq_len, "data.val_tokens": 4 * args.seq_len,
        "stage1.steps": 0, "stage2.steps": args.steps, "stage2.batch_size": args.per_gpu_batch * n,
        "stage2.grad_accum": args.grad_accum, "checkpoint_every": 10**6, "samples": "[Hello]", "sample_tokens": 4,
        "device": args.device, "placement": args.placement, "compile": str(args.compile).lower(),
    }
    cmd = [sys.executable, "-m", "linearize", "convert", args.model, "--out", str(out), "--nproc", str(n)]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    if args.profile:  # each rank profiles these steps (linearize.pipelines.profiling)
        env = env | {"LINEARIZE_PROFILE": args.profile}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"{n}-GPU run failed ({done.returncode}):\n{done.stderr[-4000:]}")
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    steps = [l for l in lines if l["stage"] == "stage2"]
    window = parse_window(args.profile)
    skip = set(range(window[0] + 1, window[1] + 1)) if window else set()  # metrics count steps from 1
    timed = [l["tokens_per_s"] for l in steps[args.warmup :] if l["step"] not in skip]
    report = json.loads((out / "report.json").read_text())
    (args.out / f"metrics-{n}gpu.jsonl").write_text((out / "metrics.jsonl").read_text())
    for prof in sorted(out.glob("profile-stage2-rank*.md")):
        shutil.copy(prof, args.out / f"profile-{n}gpu-{prof.stem.split('-')[-1]}.md")
    return {
        "gpus": n,
        "global_batch_rows": args.per_gpu_batch * n,
        "tokens_per_step": args.per_gpu_batch * n * args.grad_accum * args.seq_len,
        "tokens_per_s_median": statistics.median(timed),
        "tokens_per_s_min": min(timed),
        "tokens_per_s_max": max(timed),
        "step_seconds_median": args.per_gpu_batch * n * args.grad_accum * args.seq_len / statistics.median(timed),
        "timed_steps": len(timed),
        "final_loss": steps[-1]["loss"],
        "peak_memory_mib_rank0": report["peak_memory_mb"],
        "peak_memory_mib_per_rank": report.get("peak_memory_mb_per_rank"),  # before rank 0's export
        "placement": report["environment"].get("placement", "replicate"),
        "device": report["environment"]["device"],
        "run_wall_seconds": wall,
        "command": " ".join(cmd),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="a model name or directory; 'host-proxy': a SmolLM2-shaped "
                    "model at tiny widths, whose step is its host overhead (see host_proxy_model)")
    ap.add_argument("--gpus", default="1,2", help="process counts to compare, e.g. 1,2")
    ap.add_argument("--per-gpu-batch", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--source", default="synthetic", help="'synthetic' (generated text) or any data.source")
    ap.add_argument("--device", default="cuda", help="cuda (NCCL); cpu only to smoke-test this script (gloo)")
    ap.add_argument("--placement", default="auto", help="auto (replicate when the weights take <= 10%% of a GPU, else sharded) | sharded | replicate")
    ap.add_argument("--profile", default="", help="START:COUNT: profile those stage-2 steps on every rank "
                    "(LINEARIZE_PROFILE); writes OUT/profile-<N>gpu-rank<r>.md (host and device time by op). "
                    "Profiled steps run slower: they are left out of the timed median.")
    ap.add_argument("--compile", action="store_true", help="compile=true: the decoder layers through torch.compile "
                    "(the first warm-up steps then hold the compiles)")
    ap.add_argument("--out", type=Path, default=Path("results/distributed-bench"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/linearize-bench"))
    args = ap.parse_args()
    try:
        parse_window(args.profile)  # before any run starts
    except ValueError as e:
        ap.error(str(e))
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    for run_dir in args.work.glob("run-*gpu"):  # a new measurement, not a resume
        shutil.rmtree(run_dir)
    source = str(synthetic_text(args.work / "text.txt")) if args.source == "synthetic" else args.source
    if args.model == "host-proxy":
        args.model = str(host_proxy_model(args.work / "host-proxy"))
    env = os.environ | NO_MULTICAST | {"TQDM_DISABLE": "1"}

    import torch

    results = [run_one(args, int(n), source, args.work, env) for n in args.gpus.split(",")]
    base = results[0]
    for r in results:
        r["speedup_vs_first"] = r["tokens_per_s_median"] / base["tokens_per_s_median"]
        r["scaling_efficiency"] = r["speedup_vs_first"] / (r["gpus"] / base["gpus"])
    summary = {
        "what": "stage-2 LoRA training throughput (tokens/s, global), same per-GPU batch: FSDP2 (sharded) or DDP (replicate)",
        "model": args.model, "seq_len": args.seq_len, "per_gpu_batch": args.per_gpu_batch, "grad_accum": args.grad_accum,
        "steps": args.steps, "warmup": args.warmup, "data": args.source, "compile": args.compile,
        "torch": torch.__version__, "env": NO_MULTICAST, "results": results,
    }
    (args.out / "bench.json").write_text(json.dumps(summary, indent=2))
    md = [
        f"# Stage-2 throughput, {args.model}: {' vs '.join(str(r['gpus']) for r in results)} GPU(s)", "",
        f"Per-GPU batch {args.per_gpu_batch} x {args.seq_len} tokens (x{args.grad_accum} accumulation), {args.steps} steps, "
        f"median over steps after the first {args.warmup}; decoder layers {'compiled' if args.compile else 'eager'}; "
        f"torch {torch.__version__}; device {base['device']}; "
        "NVLink multicast off (" + ", ".join(f"{k}={v}" for k, v in NO_MULTICAST.items()) + ").", "",
        "| GPUs | placement | global batch (rows) | tokens/s (median) | min - max | s/step | speedup | efficiency | peak MiB per rank (before export) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        md.append(
            f"| {r['gpus']} | {r['placement']} | {r['global_batch_rows']} | {r['tokens_per_s_median']:,.0f} | {r['tokens_per_s_min']:,.0f} - "
            f"{r['tokens_per_s_max']:,.0f} | {r['step_seconds_median']:.3f} | {r['speedup_vs_first']:.2f}x | "
            f"{100 * r['scaling_efficiency']:.0f}% | {', '.join(f'{p:,.0f}' for p in r['peak_memory_mib_per_rank'] or [r['peak_memory_mib_rank0']])} |"
        )
    md += ["", "Commands:", ""] + [f"    {r['command']}" for r in results] + [""]
    (args.out / "bench.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
