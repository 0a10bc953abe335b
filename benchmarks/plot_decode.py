"""Decode tokens/s and peak memory against the batch, from one or more generation benchmark results.

    python benchmarks/plot_decode.py benchmarks/results/generate-A.json benchmarks/results/generate-B.json \\
        --out benchmarks/results/decode-batches.png

Ours and the base are often timed in separate device calls (`scripts/gpu_decode_calls.sh 6`): give both files;
a later file's row replaces an earlier one's of the same model, loop and batch. Each model's largest batch
(`--fit` rows, e.g. from `gpu_decode_calls.sh 4`) is marked where it meets the device's memory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.gen_report import batch_plot  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", type=Path, help="generate-*.json files, oldest first")
    ap.add_argument("--out", type=Path, required=True, help="the PNG to write")
    ap.add_argument("--title", default=None)
    args = ap.parse_args(argv)
    payloads = []
    for p in args.results:
        try:
            payloads.append(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            print(f"error: {p}: not a readable benchmark result ({e})", file=sys.stderr)
            return 2
    if batch_plot(payloads, args.out, args.title) is None:
        print("error: no (model, loop) has decode rows at two or more batches in these files", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
