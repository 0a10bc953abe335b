"""Length generalization of stage 1: the plain recipe, ``linearize.length_norm`` and ``linearize.sink_tokens``
(issue 6), on the CPU.

Runs attention transfer only (stage 2 off) at one training length for each variant (``VARIANTS``: the plain
recipe, ``length_norm``, 4 sink tokens), through the pipeline (``linearize.pipelines.run.run_conversion``,
resumable), then the sliding-window perplexity of the base model and of each variant at several context
lengths on the same held-out text (``linearize.eval``), and writes ``results.json`` and ``README.md`` under
``--out``.

Every length scores the same ``--eval-tokens`` tokens of the stream: ``windows = 1 + ceil((N - L) / (L/2))``
windows of L tokens at stride L/2, so perplexities at different lengths are of the same text.

``--variants`` picks the variants to run now. An existing ``--out/results.json`` made with the same settings
is merged into, not overwritten: its rows (and the base model's, which is then not evaluated again) are
kept, and the README's hand-written part (from ``## Reading`` on) is kept as it is.

    python scripts/length_generalization.py --model smollm2-135m --steps 40
    python scripts/length_generalization.py --steps 40 --variants sink     # add one row to the results
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

VARIANTS = {
    "plain": [],
    "length_norm": ["linearize.length_norm=true"],
    "sink": ["linearize.sink_tokens=4"],
    "nope": ["linearize.feature_rope=false"],  # feature maps on q, k before RoPE
    "nope_lennorm": ["linearize.feature_rope=false", "linearize.length_norm=true"],
}

#: settings that may differ between the calls merged into one results.json (they change no measurement)
PER_CALL = {"variants", "fresh", "runs", "out"}

#: the README's hand-written part, kept across calls
READING = "## Reading"


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
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--fresh", action="store_true", help="overwrite --out/results.json instead of merging into it")
    args = p.parse_args(argv)
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    return args


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
    weights = load_file(out / "stage1_final.safetensors")
    alphas = by_layer(weights, "length_alpha")
    if alphas:
        flat = torch.cat([v.float().flatten() for v in alphas.values()])
        record["length_alpha"] = {
            "mean": flat.mean().item(), "min": flat.min().item(), "max": flat.max().item(),
            "per_layer_mean": [v.float().mean().item() for v in alphas.values()],
        }
    us, cs = by_layer(weights, "sink_u"), by_layer(weights, "sink_c")
    if cs:
        record["sink"] = {"per_layer": [sink_stats(i, us[i].float(), cs[i].float()) for i in cs]}
    return record


def by_layer(weights: dict[str, torch.Tensor], name: str) -> dict[int, torch.Tensor]:
    """{layer index: tensor} of the parameters named ``...layers.<i>...<name>``, in layer order (a
    checkpoint's keys come in string order: layers 0, 1, 10, 11, ...)."""
    found = {}
    for key, value in weights.items():
        parts = key.split(".")
        if parts[-1] == name:
            found[int(parts[parts.index("layers") + 1])] = value
    return dict(sorted(found.items()))


def sink_stats(layer: int, u: torch.Tensor, c: torch.Tensor) -> dict:
    """The sink feature of one layer: u [H, D], c [H] -> per-head norms of u and the spread of c."""
    norms = u.norm(dim=-1)
    return {"layer": layer, "c_mean": c.mean().item(), "c_min": c.min().item(), "c_max": c.max().item(),
            "u_norm_mean": norms.mean().item(), "u_norm_max": norms.max().item()}


def main(argv=None) -> None:
    args = parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    variants = args.variants.split(",")
    started = time.perf_counter()
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    previous = None if args.fresh else load_previous(args.out / "results.json", settings, lengths)
    runs = {name: train(args, name, VARIANTS[name]) for name in variants}
    models = {name: str(args.runs / name / "model") for name in variants}
    if previous is None or "base" not in previous["ppl"]:
        models = {"base": args.model} | models
    ppl: dict[str, dict[int, float]] = {m: {} for m in models}
    scored: dict[int, int] = {}
    eval_seconds = {}
    for n in lengths:
        t0 = time.perf_counter()
        rep = evaluate(list(models.values()), [f"ppl:{args.source}@{n}"], limit=windows_for(args.eval_tokens, n),
                       device=args.device, batch_size=4 * args.eval_batch_size, progress=False,
                       echo=lambda m: print(f"[eval@{n}] {m}", flush=True))
        eval_seconds[n] = time.perf_counter() - t0
        for label, name in zip(rep["models"], models):
            r = rep["results"][label][f"ppl:{args.source}@{n}"]
            ppl[name][n] = r[f"ppl@{n}"]
            scored[n] = r[f"tokens@{n}"]
    call = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "evaluated": list(models), "environment": environment(), "eval_seconds": eval_seconds,
        "total_seconds": time.perf_counter() - started,
        "cpu_seconds": (lambda u: u.ru_utime + u.ru_stime)(resource.getrusage(resource.RUSAGE_SELF)),
    }
    result = {"settings": {k: v for k, v in settings.items() if k not in PER_CALL}, "runs": {}, "ppl": {}, "tokens_scored": {}, "calls": []}
    if previous is not None:
        result = previous
        for n, t in scored.items():
            if result["tokens_scored"].get(n, t) != t:
                raise SystemExit(f"@{n}: {t} tokens scored now but {result['tokens_scored'][n]} before; the held-out text changed")
    result["runs"] |= runs
    for name, row in ppl.items():
        result["ppl"][name] = row
    result["tokens_scored"] |= scored
    result["calls"].append(call)
    order = ["base"] + [v for v in VARIANTS if v in result["ppl"]]
    result["ppl"] = {m: result["ppl"][m] for m in order}
    result["runs"] = {m: result["runs"][m] for m in order if m in result["runs"]}
    result["ratio_vs_base"] = {m: {n: result["ppl"][m][n] / result["ppl"]["base"][n] for n in lengths} for m in order[1:]}
    args.out.mkdir(parents=True, exist_ok=True)
    readme = args.out / "README.md"
    reading = ""
    if previous is not None and readme.exists() and READING in readme.read_text():
        reading = readme.read_text()[readme.read_text().index(READING):]
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    readme.write_text(markdown(result, lengths) + ("\n" + reading if reading else ""))
    print(markdown(result, lengths))


def environment() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__}


def load_previous(path: Path, settings: dict, lengths: list[int]) -> dict | None:
    """The results.json to merge into (keys back to ints, one-call files in the ``calls`` form), or None.
    Refuses one made with other settings: its rows would not compare with the new ones."""
    if not path.exists():
        return None
    r = json.loads(path.read_text())
    differ = {k: (v, settings.get(k)) for k, v in r["settings"].items() if k not in PER_CALL and k in settings and settings[k] != v}
    if differ:
        raise SystemExit(f"{path} was made with other settings {differ} (before, now); pass --fresh or another --out")
    r["settings"] = {k: v for k, v in r["settings"].items() if k not in PER_CALL} | {
        k: v for k, v in settings.items() if k not in PER_CALL and k not in r["settings"]}
    for key in ("ppl", "ratio_vs_base"):
        r[key] = {m: {int(n): x for n, x in row.items()} for m, row in r.get(key, {}).items()}
    r["tokens_scored"] = {int(n): t for n, t in r["tokens_scored"].items()}
    if "calls" not in r:  # written before calls were merged: its one call's fields are at the top
        r["calls"] = [{
            "command": r.pop("command"), "evaluated": list(r["ppl"]), "environment": r.pop("environment"),
            "eval_seconds": r.pop("eval_seconds"), "total_seconds": r.pop("total_seconds"), "cpu_seconds": r.pop("cpu_seconds"),
        }]
    missing = [n for n in lengths if any(n not in row for row in r["ppl"].values())]
    if missing:
        raise SystemExit(f"{path} has no perplexities at {missing}; pass --fresh or the same --lengths")
    return r


def markdown(r: dict, lengths: list[int]) -> str:
    s = r["settings"]
    head = "| model | " + " | ".join(f"ppl@{n}" for n in lengths) + " |"
    rows = [m for m in r["ppl"] if m != "base"]
    lines = [
        "# Length generalization of stage 1: " + " vs ".join(f"`{m}`" if m != "plain" else m for m in rows) + " (CPU)", "",
        f"{s['model']}, attention transfer only (no LoRA), {s['steps']} steps x {s['batch_size']} x {s['seq_len']} tokens "
        f"of `{s['source']}` (lr {s['lr']}, window {s['window']}, f {s['feature_dim']}); `length_norm` from "
        f"{s['length_norm_from']} keys; `sink` is `sink_tokens=4`. Sliding-window perplexity (stride L/2) of the "
        f"held-out `{s['source']}` text, the same {', '.join(str(r['tokens_scored'][n]) for n in lengths)} tokens "
        "scored at each length.", "",
        head, "|---|" + "---:|" * len(lengths),
    ]
    for m, row in r["ppl"].items():
        cells = [f"{row[n]:.2f}" + (f" ({r['ratio_vs_base'][m][n]:.2f}x)" if m in r["ratio_vs_base"] else "") for n in lengths]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "Ratios are to the base model at the same length."]
    a = r["runs"].get("length_norm", {}).get("length_alpha")
    if a:
        lines += ["", f"Learned `length_alpha` after stage 1: mean {a['mean']:.3f}, min {a['min']:.3f}, max {a['max']:.3f}; "
                      f"per-layer means (layer 0 first) {', '.join(f'{x:.3f}' for x in a['per_layer_mean'])}."]
    sink = r["runs"].get("sink", {}).get("sink")
    if sink:
        lines += ["", "Learned sink feature after stage 1, per layer: c (mean, min..max over heads) and |u_h| (mean, max over heads):", "",
                  "| layer | c mean | c min..max | \\|u\\| mean | \\|u\\| max |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {x['layer']} | {x['c_mean']:.2f} | {x['c_min']:.2f}..{x['c_max']:.2f} | {x['u_norm_mean']:.2f} | {x['u_norm_max']:.2f} |"
                  for x in sink["per_layer"]]
        lines.append("")
    for name, run in r["runs"].items():
        st = run["stage1"]
        final = st.get("final_loss")
        lines.append(f"- {name}: stage 1 final transfer loss {final:.4f}, {st.get('seconds', 0):.0f} s" if final is not None else f"- {name}: stage 1 {st}")
    for i, call in enumerate(r["calls"], 1):
        env = call["environment"]
        lines += ["", f"Call {i} (evaluated {', '.join(call['evaluated'])}): wall time {call['total_seconds'] / 60:.1f} min "
                      f"({call['cpu_seconds'] / 60:.1f} min of CPU time) on {env['cpu']} ({env['threads']} threads, torch {env['torch']}).",
                  "", f"    {call['command']}"]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
