"""The generation benchmark's printed table and its JSON + markdown files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from benchmarks.report import _table, header_lines, save_results


def _f(x, nd=2, scale=1.0):
    return "-" if x is None else f"{x * scale:.{nd}f}"


def _note(r: dict) -> str:
    parts = [r[k] for k in ("error", "note") if r.get(k)]
    if r.get("graph_error"):
        parts.append(f"no graph: {r['graph_error']}")
    return "; ".join(parts)


def loop_name_of(r: dict) -> str:
    """A decode row's loop as the tables and plots show it (``lean+graph``: replayed in a CUDA graph)."""
    return r["loop"] + ("+graph" if r.get("graph") else "")


def largest_fits(rows: list[dict]) -> dict[str, dict]:
    """Each model's fit row with the largest batch, over the caches it was probed on (the base: static, dynamic)."""
    best: dict[str, dict] = {}
    for r in rows:
        if r["section"] == "fit" and r.get("largest") and r["largest"] > best.get(r["model"], {}).get("largest", 0):
            best[r["model"]] = r
    return best


def decode_lines(rows: list[dict], markdown: bool) -> list[str]:
    head = ["model", "loop", "B", "new tok", "prefill ms", "decode tok/s", "step ms", "floor ms", "x floor", "peak GiB",
            "cache GiB", "decode path", "note"]
    out = []
    for r in rows:
        if r["section"] != "decode":
            continue
        out.append([r["model"], loop_name_of(r), r["batch"], r.get("generated", r["new_tokens"]), _f(r.get("prefill_ms"), 1),
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
    paths = save_results(out_dir, stem, payload, "\n".join(md) + "\n", copy_to)
    png = batch_plot([payload], out_dir / f"{stem}.png")
    if png is not None and copy_to:
        shutil.copy2(png, Path(copy_to) / png.name)
    return paths + ([png] if png is not None else [])


def profile_text(r: dict, n: int = 12) -> str:
    p = r["profile"]
    lines = [f"  profile ({r['loop']} {r['model']} B={r['batch']}, {p['steps']} eager steps): {p['launches_per_step']:.0f} "
             f"launches and {p['kernel_us_per_step']:.0f} us of kernel time a step (the timed step: {r.get('step_ms', 0) * 1e3:.0f} us)"]
    lines += [f"    {k['us_per_step']:8.1f} us  x{k['launches_per_step']:<5.0f} {k['kernel']}" for k in p["top"][:n]]
    return "\n".join(lines)


def batch_plot(payloads: list[dict], path: Path, title: str | None = None) -> Path | None:
    """tokens/s and peak memory against the batch, one line per (model, loop), from the decode rows of one or
    more generation benchmark results (e.g. ours and the base timed in separate calls; a later file's row
    replaces an earlier one's of the same model, loop and batch); each model's largest batch that fits, where
    measured, is a marker on the memory panel's device-memory line. Returns None if no row has two batches."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[tuple[str, str], dict[int, dict]] = {}
    fits: dict[str, dict] = {}
    labels: dict[str, str] = {}
    for p in payloads:
        for r in p["rows"]:
            if r["section"] == "decode" and r.get("tok_s") and not r.get("cut"):
                lines.setdefault((r["model"], loop_name_of(r)), {})[r["batch"]] = r
                labels[r["model"]] = r.get("label") or r["model"]
        fits |= largest_fits(p["rows"])
    lines = {k: v for k, v in lines.items() if len(v) >= 2}
    if not lines:
        return None
    env = payloads[-1]["environment"]
    tokens = sorted({r["new_tokens"] for v in lines.values() for r in v.values()})
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    order = sorted({m for m, _ in lines} | set(fits), key=lambda m: (m != "ours", m))
    color = {m: f"C{i}" for i, m in enumerate(order)}
    for (model, loop), by_b in sorted(lines.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        bs = sorted(by_b)
        style = {"marker": "o", "color": color[model], "linestyle": "-" if model == "ours" else "--"}
        a1.plot(bs, [by_b[b]["tok_s"] for b in bs], label=f"{labels[model]}, {loop}", **style)
        mem = [b for b in bs if by_b[b].get("peak_gib") is not None]  # (no CUDA: no peak)
        if mem:
            a2.plot(mem, [by_b[b]["peak_gib"] for b in mem], **style)
    total = env.get("memory_gib")
    if total:  # the device's memory, and where each model's largest batch meets it
        a2.axhline(total, color="grey", linewidth=0.8, label=f"{env.get('device')}: {total:g} GiB")
        for model in order:
            if model in fits:
                a2.scatter([fits[model]["largest"]], [total], marker="v", s=60, zorder=3, color=color[model],
                           label=f"{model}: largest batch {fits[model]['largest']:,}")
        a2.legend(fontsize=8, loc="lower right")
    for a, ylabel in ((a1, "decode tokens/s"), (a2, "peak memory (GiB)")):
        if not a.lines:  # (a CPU run has no peak memory: the panel stays empty, on linear axes)
            a.set_ylabel(f"{ylabel}: not measured")
            continue
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        a.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:,.0f}"))
        a.set_xlabel("batch (sequences)")
        a.set_ylabel(ylabel)
        a.grid(alpha=0.3, which="both")
    a1.legend(fontsize=8)
    fig.suptitle(title or f"Decode, {tokens[0] if len(tokens) == 1 else tokens} new tokens after a "
                 f"{payloads[-1]['args']['prompt_len']}-token prompt ({env.get('device')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
