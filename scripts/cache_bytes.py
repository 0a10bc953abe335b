"""Decode-cache bytes a sequence holds, per layout of SmolLM2-135M, Qwen2.5-Coder-0.5B, Gemma3-270M and the
Llama-3.1-8B architecture (issue 6's largest-batch goal), from the shapes alone
(``benchmarks.gen_floor.state_bytes_per_sequence``; no GPU, models built on the meta device from
``benchmarks/configs/*.json``).

    python scripts/cache_bytes.py [--tokens 4224] [--models smollm2-135m,qwen2.5-coder-0.5b,gemma3-270m,llama3.1-8b] [--out results/issue6/cache-bytes.md]

The largest batch that fits is about (free memory - weights - activations) / these bytes, so base / layout
is an upper bound on the largest-batch ratio (the measured all-linear ratio of SmolLM2, 5.9x, sits under its
6.5x). The columns split a hybrid layer's bytes: the fp32 sums S and z, the ring's k and v, and the ring's
feature-mapped keys phi_k (kept so that a key leaving the window needs no feature map).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import linearize  # noqa: E402
from benchmarks.gen_floor import hybrid_bytes_per_sequence, model_shape, state_bytes_per_sequence  # noqa: E402
from benchmarks.random_model import random_model  # noqa: E402

RETR10 = [7, 8, 14, 15, 17, 18, 20, 21, 22, 23]
# KV heads kept softmax by `linearize retrieval-layers MODEL --heads` (results/issue6/retrieval-layers/*-heads-sink4.md)
SMOL_HEADS = [[18, 2], [23, 0], [7, 2], [17, 1], [8, 0], [21, 2], [14, 1], [20, 1], [20, 2], [15, 2], [22, 2], [21, 0], [6, 0],
              [14, 0], [22, 1], [19, 1], [21, 1], [5, 1], [7, 0], [8, 1]]  # the probe's order
QWEN_HEADS = [[16, 0], [16, 1], [9, 1], [11, 1], [17, 1], [7, 1]]
NOPE = {"feature_rope": False}
KV = {"feature_map_per_kv_head": True}
MODELS = {
    "smollm2-135m": ("SmolLM2-135M", {
        "all 30 linearized (smol-main)": NOPE,
        "all 30 linearized, key maps per KV head (abl-nope-kvmaps)": NOPE | KV,
        "10 kept softmax (smol-retr10)": NOPE | {"sink_tokens": 4, "softmax_layers": RETR10},
        "10 kept, key maps per KV head": NOPE | {"sink_tokens": 4, "softmax_layers": RETR10} | KV,
        "6 kept (abl-nope-retr6)": NOPE | {"sink_tokens": 4, "softmax_layers": [7, 8, 17, 18, 21, 23]},
        "15 kept (abl-nope-retr15)": NOPE | {"sink_tokens": 4, "softmax_layers": [4, 5, 6, 7, 8, 14, 15, 17, 18, 19, 20, 21, 22, 23, 24]},
        "15 KV heads kept (of 90), key maps per KV head": NOPE | {"sink_tokens": 4, "softmax_heads": SMOL_HEADS[:15]} | KV,
        "20 KV heads kept, key maps per KV head": NOPE | {"sink_tokens": 4, "softmax_heads": SMOL_HEADS[:20]} | KV,
    }),
    "qwen2.5-coder-0.5b": ("Qwen2.5-Coder-0.5B (14 query heads a 2 KV heads: per-query-head key maps make a state 7x a per-KV-head one)", {
        "all 24 linearized (qwen-main)": NOPE,
        "all 24 linearized, key maps per KV head": NOPE | KV,
        "4 kept softmax (qwen-retr4)": NOPE | {"sink_tokens": 4, "softmax_layers": [9, 11, 16, 17]},
        "4 kept, key maps per KV head": NOPE | {"sink_tokens": 4, "softmax_layers": [9, 11, 16, 17]} | KV,
        "8 kept softmax (qwen-retr8)": NOPE | {"sink_tokens": 4, "softmax_layers": [3, 7, 9, 11, 13, 14, 16, 17]},
        "8 kept, key maps per KV head": NOPE | {"sink_tokens": 4, "softmax_layers": [3, 7, 9, 11, 13, 14, 16, 17]} | KV,
        "3 KV heads kept (of 48)": NOPE | {"sink_tokens": 4, "softmax_heads": QWEN_HEADS[:3]},
        "3 KV heads kept, key maps per KV head": NOPE | {"sink_tokens": 4, "softmax_heads": QWEN_HEADS[:3]} | KV,
        "4 KV heads kept, key maps per KV head": NOPE | {"sink_tokens": 4, "softmax_heads": QWEN_HEADS[:4]} | KV,
        "6 KV heads kept, key maps per KV head": NOPE | {"sink_tokens": 4, "softmax_heads": QWEN_HEADS[:6]} | KV,
    }),
    "gemma3-270m": ("Gemma3-270M (15 local layers of 512-token windows, kept by every layout; 3 global)", {
        "the 3 global layers linearized (gemma-main)": NOPE,
        "layer 17 linearized, 5 and 11 kept (gemma-retr2-stage1)": NOPE | {"sink_tokens": 4, "softmax_layers": [5, 11]},
    }),
    "llama3.1-8b": ("Llama-3.1-8B architecture (LoLCATs' headline size; random weights: `gpu_decode_calls.sh 15`, `16`)", {
        "all 32 linearized (LoLCATs' layout: key maps per query head)": {},
        "all 32 linearized, key maps per KV head": KV,
    }),
}


def _split(shape) -> dict[str, int]:
    """Bytes a sequence holds in the hybrid layers, summed by part (``gen_floor.hybrid_bytes_per_sequence``)."""
    out = {"sums": 0, "kv": 0, "phi": 0}
    for L in shape.layers:
        if L.kind != "softmax":
            for k, v in hybrid_bytes_per_sequence(L, shape.elem).items():
                out[k] += v
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=128 + 4096, help="sequence length at the end of the run")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    a = p.parse_args(argv)
    root = Path(__file__).resolve().parent.parent
    lines = [f"Decode cache per sequence at {a.tokens} tokens, bf16, random weights from `benchmarks/configs/` "
             f"(`python scripts/cache_bytes.py`)"]
    for key in a.models.split(","):
        if key not in MODELS:
            p.error(f"unknown model {key!r}: choose from {', '.join(MODELS)}")
        title, layouts = MODELS[key]
        config = root / "benchmarks" / "configs" / f"{key}.json"
        base_model = random_model(config, torch.bfloat16, 0, "meta")
        base = state_bytes_per_sequence(model_shape(base_model), a.tokens)
        lines += ["", f"**{title}**", "",
                  "| layout | MiB / sequence | of it: sums S, z | ring k, v | ring phi_k | base / layout |",
                  "|---|---:|---:|---:|---:|---:|",
                  f"| base (KV cache, {base_model.config.num_hidden_layers} layers) | {base / 2**20:.1f} | | | | 1.0x |"]
        del base_model
        for name, cfg in layouts.items():
            shape = model_shape(linearize.convert(random_model(config, torch.bfloat16, 0, "meta"), linearize.LinearizeConfig(**cfg)))
            n, parts = state_bytes_per_sequence(shape, a.tokens), _split(shape)
            lines.append(f"| {name} | {n / 2**20:.1f} | {parts['sums'] / 2**20:.1f} | {parts['kv'] / 2**20:.1f} | "
                         f"{parts['phi'] / 2**20:.1f} | {base / n:.1f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
