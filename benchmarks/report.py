"""Results: the environment stamp, the printed table, and the JSON + markdown files."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def git_commit(override: str | None = None) -> dict:
    """Commit of the checkout, from git if it is there, else from .git files, else ``override``/unknown."""
    if override and override != "unknown":
        return {"commit": override, "source": "--commit"}
    try:
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if sha.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return {"commit": sha.stdout.strip(), "dirty": bool(dirty), "source": "git"}
    except (OSError, subprocess.SubprocessError):
        pass
    head = ROOT / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            name = ref[5:]
            loose = ROOT / ".git" / name
            if loose.exists():
                return {"commit": loose.read_text().strip(), "source": ".git files"}
            packed = (ROOT / ".git" / "packed-refs").read_text()
            m = re.search(rf"^([0-9a-f]{{40}}) {re.escape(name)}$", packed, re.M)
            if m:
                return {"commit": m.group(1), "source": ".git files"}
        elif re.fullmatch(r"[0-9a-f]{40}", ref):
            return {"commit": ref, "source": ".git files"}
    except OSError:
        pass
    return {"commit": os.environ.get("LINEARIZE_COMMIT", "unknown"), "source": "env" if "LINEARIZE_COMMIT" in os.environ else "none"}


def _version(mod: str) -> str:
    try:
        m = __import__(mod)
        return getattr(m, "__version__", "?")
    except Exception as e:  # missing, or broken at import
        return f"unavailable ({type(e).__name__})"


def environment(commit: str | None) -> dict:
    env = {
        "time_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "fla": _version("fla"),
        "git": git_commit(commit),
        # The kernels' launch knobs (LINEARIZE_DECODE_LAUNCH, LINEARIZE_DECODE_PREFETCH, ...) change what a run
        # times without changing the commit: a run under them says so. (The cache folder is no knob.)
        "overrides": {k: v for k, v in sorted(os.environ.items()) if k.startswith("LINEARIZE_") and k != "LINEARIZE_CACHE"},
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env |= {
            "device": torch.cuda.get_device_name(0),
            "capability": f"{p.major}.{p.minor}",
            "sms": p.multi_processor_count,
            "memory_gib": round(p.total_memory / 2**30, 1),
            "l2_mb": round(getattr(p, "L2_cache_size", 0) / 1e6, 1),
            "cudnn": torch.backends.cudnn.version(),
        }
    else:
        env["device"] = "cpu"
    return env


def _f(x, nd=2, scale=1.0):
    return "-" if x is None else f"{x * scale:.{nd}f}"


def prefill_lines(rows: list[dict], mode: str, markdown: bool) -> list[str]:
    head = ["case", "impl", "ms", "graph ms", "TFLOP/s", "GB/s", "floor ms", "% floor", "err", "first s", "note"]
    out = []
    for r in rows:
        if r.get("section") != "prefill" or r["mode"] != mode:
            continue
        note = r.get("error") or r.get("variant") or ""
        if r.get("spread") is not None:
            note = f"spread {100 * r['spread']:.0f}% " + note
        if r.get("graph_error"):
            note += f" [graph: {r['graph_error']}]"
        err = r.get("check_err")
        err_s = "-" if err is None else (f"{err:.1e}" + ("" if r.get("check_ok", True) else " BAD"))
        out.append([r["case"], r["row"], _f(r.get("ms"), 3), _f(r.get("graph_ms"), 3), _f(r.get("tflops"), 1),
                    _f(r.get("gbps"), 0), _f(r.get("floor_ms"), 3), _f(r.get("frac_floor"), 0, 100), err_s,
                    _f(r.get("cold_first_call_s") or r.get("first_call_s"), 1), note[:120]])
    return _table(head, out, markdown)


def decode_lines(rows: list[dict], markdown: bool) -> list[str]:
    head = ["case", "impl", "us", "graph us", "TFLOP/s", "GB/s", "floor us", "% floor", "err", "first s", "note"]
    out = []
    for r in rows:
        if r.get("section") != "decode":
            continue
        note = r.get("error") or ""
        if r.get("graph_error"):
            note += f" [graph: {r['graph_error']}]"
        err = r.get("check_err")
        err_s = "-" if err is None else (f"{err:.1e}" + ("" if r.get("check_ok", True) else " BAD"))
        out.append([r["case"], r["row"], _f(r.get("ms"), 1, 1e3), _f(r.get("graph_ms"), 1, 1e3), _f(r.get("tflops"), 2),
                    _f(r.get("gbps"), 0), _f(r.get("floor_ms"), 1, 1e3), _f(r.get("frac_floor"), 0, 100), err_s,
                    _f(r.get("first_call_s"), 1), note[:120]])
    return _table(head, out, markdown)


def _table(head: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    if not rows:
        return []
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        return lines + ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]
    w = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    w[-1] = min(w[-1], 60)
    fmt = lambda r: "  ".join(str(c)[: w[i]].ljust(w[i]) if i < 2 or i == len(r) - 1 else str(c).rjust(w[i]) for i, c in enumerate(r))  # noqa: E731
    return [fmt(head)] + [fmt(r) for r in rows]


def header_lines(env: dict, ceilings: dict | None, markdown: bool) -> list[str]:
    g = env["git"]
    commit = g["commit"] + (" (dirty)" if g.get("dirty") else "")
    lines = [
        f"device: {env.get('device')} (sm {env.get('capability', '-')}, {env.get('sms', '-')} SMs, L2 {env.get('l2_mb', '-')} MB)",
        f"torch {env['torch']} (CUDA {env['cuda']}, cuDNN {env.get('cudnn', '-')}), triton {env['triton']}, fla {env['fla']}, "
        f"python {env['python']}",
        f"commit {commit}; {env['time_utc']}",
    ]
    if env.get("overrides"):
        lines.append("environment overrides: " + " ".join(f"{k}={v}" for k, v in env["overrides"].items()))
    if ceilings:
        lines.append(f"ceilings measured here: copy {ceilings['copy_gbps']:.0f} GB/s (read + write), "
                     f"bf16 matmul {ceilings['matmul_bf16_tflops']:.0f} TFLOP/s")
    return [("- " + ln) if markdown else ln for ln in lines]


def result_stem(prefix: str, device: str) -> str:
    """``PREFIX-DEVICE-UTCSTAMP``, the file stem of one benchmark run's results (device name slugged)."""
    slug = "".join(ch if ch.isalnum() else "-" for ch in device).strip("-").lower()
    return f"{prefix}-{slug}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def save_results(out_dir: Path, stem: str, payload: dict, markdown: str, copy_to: str | None) -> list[Path]:
    """``stem.json`` (written atomically: a run cut mid-write keeps the last whole file) and ``stem.md`` in
    ``out_dir``, both also copied to ``copy_to`` ($OUT on the device) if given."""
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    tmp = jpath.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(jpath)
    mpath.write_text(markdown)
    paths = [jpath, mpath]
    if copy_to:
        dest = Path(copy_to)
        dest.mkdir(parents=True, exist_ok=True)
        for p in paths:
            shutil.copy(p, dest / p.name)
    return paths


def add_kernel_bench_args(p, smoke_help: str) -> None:
    """The options the one-kernel benchmarks (softmax_decode, tune_decode) share: --smoke and where results go."""
    p.add_argument("--smoke", action="store_true", help=smoke_help)
    p.add_argument("--out-dir", default=None, help="default benchmarks/results (the smoke run writes nothing unless given)")
    p.add_argument("--copy-to", default=None, help="also copy the JSON and markdown here ($OUT on the device)")
    p.add_argument("--commit", default=None, help="git commit to stamp when the checkout has no .git")


def require_interpreter_or_cuda(args, what: str) -> None:
    """--smoke runs under Triton's interpreter, anything else on CUDA: a one-line SystemExit otherwise."""
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--smoke runs the kernel under Triton's interpreter: set TRITON_INTERPRET=1")
    elif not torch.cuda.is_available():
        raise SystemExit(f"{what} needs CUDA; use --smoke (with TRITON_INTERPRET=1) on a CPU machine")


def save_kernel_bench(args, prefix: str, payload: dict, markdown: str) -> None:
    """A one-kernel benchmark's JSON and markdown into --out-dir (default benchmarks/results; a smoke run
    writes only where --out-dir says)."""
    out_dir = Path(args.out_dir) if args.out_dir else (None if args.smoke else ROOT / "benchmarks" / "results")
    if out_dir is None:
        return
    stem = result_stem(prefix, payload["environment"]["device"])
    save_results(out_dir, stem, payload, markdown, args.copy_to)
    print(f"wrote {out_dir}/{stem}.json and .md")


def write_results(out_dir: Path, stem: str, payload: dict, summary: list[str], copy_to: str | None) -> list[Path]:
    env, rows = payload["environment"], payload["rows"]
    md = [f"# Attention benchmark: {env.get('device')}", ""] + header_lines(env, payload.get("ceilings"), True)
    md += ["", f"Command: `{payload['command']}`", ""]
    if summary:
        md += ["## Targets (issue 5)", ""] + [f"- {s}" for s in summary] + [""]
    for mode, title in (("fwd", "Forward"), ("fwdbwd", "Forward + backward")):
        lines = prefill_lines(rows, mode, True)
        if lines:
            md += [f"## {title}", ""] + lines + [""]
    dl = decode_lines(rows, True)
    if dl:
        md += ["## Decode (one token)", ""] + dl + [""]
    md += ["Columns: ms = median of triton.testing.do_bench (L2 flushed before each call); graph ms = CUDA-graph "
           "replay, per call; TFLOP/s, GB/s and % floor use the eager ms and the FLOP/byte counts in "
           "benchmarks/attention.py's docstring; floor = max(FLOPs / matmul ceiling, bytes / copy ceiling); "
           "err = max relative error of output and gradients vs hybrid_attention_reference at the check shape; "
           "first s = the first call of that row's head shape (compile, autotune; at the check shape when checked)."]
    return save_results(out_dir, stem, payload, "\n".join(md) + "\n", copy_to)
