"""Decode-cache bytes a sequence holds, per layout of SmolLM2-135M (issue 6's largest-batch goal), from the
shapes alone (``benchmarks.gen_floor.state_bytes_per_sequence``; no GPU, random weights).

    python scripts/cache_bytes.py [--tokens 4224] [--out results/issue6/cache-bytes.md]

The largest batch that fits is about (free memory - weights - activations) / these bytes, so base / layout
is an upper bound on the largest-batch ratio (the measured all-linear ratio, 5.9x, sits under its 6.5x).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import linearize  # noqa: E402
from benchmarks.gen_floor import model_shape, state_bytes_per_sequence  # noqa: E402
from benchmarks.random_model import random_model  # noqa: E402

CONFIG = "benchmarks/configs/smollm2-135m.json"
RETR10 = [7, 8, 14, 15, 17, 18, 20, 21, 22, 23]
LAYOUTS = {
    "all 30 linearized (smol-main)": {"feature_rope": False},
    "all 30 linearized, key maps per KV head (abl-nope-kvmaps)": {"feature_rope": False, "feature_map_per_kv_head": True},
    "10 kept softmax (smol-retr10)": {"feature_rope": False, "sink_tokens": 4, "softmax_layers": RETR10},
    "10 kept, key maps per KV head": {"feature_rope": False, "sink_tokens": 4, "softmax_layers": RETR10, "feature_map_per_kv_head": True},
    "6 kept (abl-nope-retr6)": {"feature_rope": False, "sink_tokens": 4, "softmax_layers": [7, 8, 17, 18, 21, 23]},
    "15 kept (abl-nope-retr15)": {"feature_rope": False, "sink_tokens": 4,
                                  "softmax_layers": [4, 5, 6, 7, 8, 14, 15, 17, 18, 19, 20, 21, 22, 23, 24]},
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=128 + 4096, help="sequence length at the end of the run")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    a = p.parse_args(argv)
    base = state_bytes_per_sequence(model_shape(random_model(CONFIG, torch.bfloat16, 0)), a.tokens)
    lines = [f"Decode cache per sequence at {a.tokens} tokens, SmolLM2-135M, bf16 (`python scripts/cache_bytes.py`)", "",
             "| layout | MiB / sequence | base / layout |", "|---|---:|---:|", f"| base (KV cache, 30 layers) | {base / 2**20:.1f} | 1.0x |"]
    for name, cfg in LAYOUTS.items():
        model = linearize.convert(random_model(CONFIG, torch.bfloat16, 0), linearize.LinearizeConfig(**cfg))
        n = state_bytes_per_sequence(model_shape(model), a.tokens)
        lines.append(f"| {name} | {n / 2**20:.1f} | {base / n:.1f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
