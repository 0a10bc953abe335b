"""The generation benchmark's printed table and its JSON + markdown files."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.report import _table, header_lines, save_results


def _f(x, nd=2, scale=1.0):
    return "-" if x is None else f"{x * scale:.{nd}f}"


def _note(r: dict) -> str:
    parts = [r[k] for k in ("error", "note") if r.get(k)]
    if r.get("graph_error"):
        parts.append(f"no graph: {r['graph_error']}")
    return "; ".join(parts)


def decode_lines(rows: list[dict], markdown: bool) -> list[str]:
    head = ["model", "loop", "B", "new tok", "prefill ms", "decode tok/s", "step ms", "floor ms", "x floor", "peak GiB",
            "cache GiB", "decode path", "note"]
    out = []
    for r in rows:
        if r["section"] != "decode":
            continue
        loop = r["loop"] + ("+graph" if r.get("graph") else "")
        out.append([r["model"], loop, r["batch"], r.get("generated", r["new_tokens"]), _f(r.get("prefill_ms"), 1),
                    _f(r.get("tok_s"), 0), _f(r.get("step_ms"), 3), _f(r.get("floor_step_ms"), 3), _f(r.get("x_floor"), 2),
                    _f(r.get("peak_gib"), 2), _f(r.get("cache_gib"), 2), r.get("decode_path") or "-", _note(r)[:110]])
    return _table(head, out, markdown)


def fit_lines(rows: list[dict], markdown: bool) -> list[str]:
    head = ["model", "cache", "new tok", "largest batch", "first failing", "search", "probes", "s", "state MiB/seq", "note"]
    out = []
    for r in rows:
        if r["section"] != "fit":
            continue
        probes = " ".join(f"{p['batch']}{'+' if p['fits'] else '-'}" for p in r.get("probes", []))
        out.append([r["model"], r["cache"], r["new_tokens"], r.get("largest", "-"), r.get("smallest_failing") or "-",
                    r.get("stopped", "-"), probes or "-", _f(r.get("seconds"), 0), _f(r.get("state_gib_per_seq"), 1, 1024),
                    (r.get("error") or r.get("note") or "")[:110]])
    return _table(head, out, markdown)


def model_lines(payload: dict) -> list[str]:
    m = payload["models"]
    lines = [f"model: {m.get('model')} ({m.get('dtype')}); linearized: {m.get('linearized')}"]
    if m.get("linearize_config"):
        lines.append(f"LinearizeConfig: {json.dumps(m['linearize_config'], sort_keys=True)}")
    if m.get("layers"):
        lines.append("layers (linearized / total): " + ", ".join(f"{k} {v['hybrid']}/{v['total']}" for k, v in m["layers"].items())
                     + "; weights read per step: " + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in m.get("weight_bytes", {}).items()))
    a = payload["args"]
    lines.append(f"prompt {a['prompt_len']} random token ids (seed {a['seed']}), {a['tokens']} new tokens, greedy; "
                 f"batches {a['batches']}; budget {a['budget_s']:.0f} s")
    return lines


def print_report(payload: dict) -> None:
    env = payload["environment"]
    for line in header_lines(env, payload.get("ceilings"), False) + [f"transformers {env.get('transformers')}"] + model_lines(payload):
        print(line)
    dl = decode_lines(payload["rows"], False)
    if dl:
        print("\n== decode ==")
        print("\n".join(dl))
    fl = fit_lines(payload["rows"], False)
    if fl:
        print("\n== largest batch that fits ==")
        print("\n".join(fl))
    if payload.get("goals"):
        print("\n== goals (issue 6, decode) ==")
        print("\n".join(payload["goals"]))


def write_report(out_dir: Path, stem: str, payload: dict, copy_to: str | None) -> list[Path]:
    env = payload["environment"]
    md = [f"# Generation benchmark: {env.get('device')}", ""]
    md += header_lines(env, payload.get("ceilings"), True) + [f"- transformers {env.get('transformers')}"]
    md += [f"- {line}" for line in model_lines(payload)]
    md += ["", f"Command: `{payload['command']}`", ""]
    if payload.get("goals"):
        md += ["## Goals (issue 6, decode)", ""] + [f"- {g}" for g in payload["goals"]] + [""]
    dl = decode_lines(payload["rows"], True)
    if dl:
        md += ["## Decode", ""] + dl + [""]
    profiled = [r for r in payload["rows"] if r.get("profile")]
    if profiled:
        md += ["## Kernel profile (eager steps of the warm-up run, torch.profiler)", "", "```"]
        md += [profile_text(r, 25) for r in profiled] + ["```", ""]
    fl = fit_lines(payload["rows"], True)
    if fl:
        md += ["## Largest batch that fits", ""] + fl + [""]
    md += [
        "Columns: decode tok/s = B (N - 1) / decode seconds (the forwards after the prefill, CUDA-synchronized; "
        "graph capture excluded); step ms = decode seconds / (N - 1); floor ms = the step's fewest bytes over the "
        "measured copy bandwidth (or FLOPs over the matmul rate, whichever is larger), averaged over the run "
        "(formula in benchmarks/generate.py's docstring); x floor = measured / floor; peak GiB = "
        "torch.cuda.max_memory_allocated over the row (weights included); cache GiB = the KV cache or the "
        "state + ring the sequences hold at the end; decode path = where the linearized layers decoded. "
        "Loops: generate = HF model.generate; lean = forward + argmax per token (+graph: replayed in a CUDA "
        "graph; base on a StaticCache sized prompt + N). The goals compare each model's fastest loop. "
        "Largest batch: doubling then bisection (probes: B+ fits, B- fails), prefill + 3 steps in a cache "
        "sized for prompt + N tokens.",
    ]
    return save_results(out_dir, stem, payload, "\n".join(md) + "\n", copy_to)


def profile_text(r: dict, n: int = 12) -> str:
    p = r["profile"]
    lines = [f"  profile ({r['loop']} {r['model']} B={r['batch']}, {p['steps']} eager steps): {p['launches_per_step']:.0f} "
             f"launches and {p['kernel_us_per_step']:.0f} us of kernel time a step (the timed step: {r.get('step_ms', 0) * 1e3:.0f} us)"]
    lines += [f"    {k['us_per_step']:8.1f} us  x{k['launches_per_step']:<5.0f} {k['kernel']}" for k in p["top"][:n]]
    return "\n".join(lines)
