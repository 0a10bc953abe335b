"""Length generalization of stage 1 with and without ``linearize.length_norm`` (issue 6), on the CPU.

Runs attention transfer only (stage 2 off) at one training length for (a) the plain recipe and (b)
``length_norm``, through the pipeline (``linearize.pipelines.run.run_conversion``, resumable), then the
sliding-window perplexity of the base model, (a) and (b) at several context lengths on the same held-out
text (``linearize.eval``), and writes ``results.json`` and ``README.md`` under ``--out``.

Every length scores the same ``--eval-tokens`` tokens of the stream: ``windows = 1 + ceil((N - L) / (L/2))``
windows of L tokens at stride L/2, so perplexities at different lengths are of the same text.

    python scripts/length_generalization.py --model smollm2-135m --steps 40
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import shlex
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from linearize.eval.run import evaluate
from linearize.pipelines.config import build_config
from linearize.pipelines.run import run_conversion

VARIANTS = {"plain": [], "length_norm": ["linearize.length_norm=true"]}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--source", default="austen", help="training and evaluation text (its held-out split is evaluated)")
    p.add_argument("--seq-len", type=int, default=512, help="training length")
    p.add_argument("--lengths", default="512,1024,2048", help="evaluation context lengths")
    p.add_argument("--steps", type=int, default=40, help="stage-1 steps")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--feature-dim", type=int, default=64)
    p.add_argument("--length-norm-from", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=4096, help="tokens of held-out text scored at every length")
    p.add_argument("--eval-batch-size", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--runs", type=Path, default=Path("runs/length-generalization"), help="run directories (resumed)")
    p.add_argument("--out", type=Path, default=Path("results/length-generalization-cpu"))
    return p.parse_args(argv)


def windows_for(tokens: int, length: int) -> int:
    return 1 + max(0, math.ceil((tokens - length) / (length // 2)))


def train(args, name: str, extra: list[str]) -> dict:
    out = args.runs / name
    overrides = [
        f"data.source={args.source}", f"data.seq_len={args.seq_len}", "data.val_tokens=1024",
        f"linearize.window={args.window}", f"linearize.feature_dim={args.feature_dim}",
        f"linearize.length_norm_from={args.length_norm_from}",
        f"stage1.steps={args.steps}", f"stage1.batch_size={args.batch_size}", f"stage1.lr={args.lr}", "stage2.steps=0",
        f"checkpoint_every={max(args.steps, 1)}", "samples=[It was]", "sample_tokens=8",
        f"device={args.device}",
    ] + extra
    cfg = build_config(None, None, overrides, model=args.model)
    t0 = time.perf_counter()
    report = run_conversion(cfg, out, resume=(out / "config.yaml").exists(), echo=lambda m: print(f"[{name}] {m}", flush=True))
    record = {
        "run": str(out), "overrides": overrides, "seconds_this_call": time.perf_counter() - t0,
        "stage1": report["stages"]["stage1"], "val_ppl_at_train_len": {k: v["ppl"] for k, v in report["evals"].items()},
    }
    alphas = {k: v for k, v in load_file(out / "stage1_final.safetensors").items() if k.endswith("length_alpha")}
    if alphas:
        flat = torch.cat([v.float().flatten() for v in alphas.values()])
        record["length_alpha"] = {
            "mean": flat.mean().item(), "min": flat.min().item(), "max": flat.max().item(),
            "per_layer_mean": [v.float().mean().item() for v in alphas.values()],
        }
    return record


def main(argv=None) -> None:
    args = parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    started = time.perf_counter()
    runs = {name: train(args, name, extra) for name, extra in VARIANTS.items()}
    models = {"base": args.model} | {name: str(args.runs / name / "model") for name in VARIANTS}
    ppl: dict[str, dict[int, float]] = {m: {} for m in models}
    scored: dict[int, int] = {}
    eval_seconds = {}
    for n in lengths:
        t0 = time.perf_counter()
        rep = evaluate(list(models.values()), [f"ppl:{args.source}@{n}"], limit=windows_for(args.eval_tokens, n),
                       device=args.device, batch_size=4 * args.eval_batch_size, progress=False,
                       echo=lambda m: print(f"[eval@{n}] {m}", flush=True))
        eval_seconds[n] = time.perf_counter() - t0
        for label, path in zip(rep["models"], models):
            r = rep["results"][label][f"ppl:{args.source}@{n}"]
            ppl[path][n] = r[f"ppl@{n}"]
            scored[n] = r[f"tokens@{n}"]
    ratios = {m: {n: ppl[m][n] / ppl["base"][n] for n in lengths} for m in VARIANTS}
    result = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "runs": runs, "ppl": ppl, "ratio_vs_base": ratios, "tokens_scored": scored,
        "eval_seconds": eval_seconds, "total_seconds": time.perf_counter() - started,
        "cpu_seconds": (lambda u: u.ru_utime + u.ru_stime)(resource.getrusage(resource.RUSAGE_SELF)),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "README.md").write_text(markdown(result, lengths))
    print(markdown(result, lengths))


def markdown(r: dict, lengths: list[int]) -> str:
    s = r["settings"]
    head = "| model | " + " | ".join(f"ppl@{n}" for n in lengths) + " |"
    lines = [
        "# Length generalization of stage 1: plain vs `length_norm` (CPU)", "",
        f"{s['model']}, attention transfer only (no LoRA), {s['steps']} steps x {s['batch_size']} x {s['seq_len']} tokens "
        f"of `{s['source']}` (lr {s['lr']}, window {s['window']}, f {s['feature_dim']}); `length_norm` from "
        f"{s['length_norm_from']} keys. Sliding-window perplexity (stride L/2) of the held-out `{s['source']}` text, "
        f"the same {', '.join(str(r['tokens_scored'][n]) for n in lengths)} tokens scored at each length.", "",
        head, "|---|" + "---:|" * len(lengths),
    ]
    for m, row in r["ppl"].items():
        cells = [f"{row[n]:.2f}" + (f" ({r['ratio_vs_base'][m][n]:.2f}x)" if m in r["ratio_vs_base"] else "") for n in lengths]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "Ratios are to the base model at the same length."]
    a = r["runs"].get("length_norm", {}).get("length_alpha")
    if a:
        lines += ["", f"Learned `length_alpha` after stage 1: mean {a['mean']:.3f}, min {a['min']:.3f}, max {a['max']:.3f}; "
                      f"per-layer means {', '.join(f'{x:.3f}' for x in a['per_layer_mean'])}."]
    for name, run in r["runs"].items():
        st = run["stage1"]
        final = st.get("final_loss")
        lines.append(f"- {name}: stage 1 final transfer loss {final:.4f}, {st.get('seconds', 0):.0f} s" if final is not None else f"- {name}: stage 1 {st}")
    lines += ["", f"Wall time {r['total_seconds'] / 60:.1f} min ({r['cpu_seconds'] / 60:.1f} min of CPU time) on {r['environment']['cpu']} "
                  f"({r['environment']['threads']} threads, torch {r['environment']['torch']}).", "",
              "Command:", "", f"    {r['command']}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
