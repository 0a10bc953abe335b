"""One table over conversion runs, with ratios to base and issue 6's goals (linearize.pipelines.results).

    python scripts/results_table.py results/smol-main results/abl-* --out results/smollm2-ablations [--title "..."]

Writes OUT/results.md (the table, then one goal table with margins), OUT/results.json (every number)
and OUT/results.png (ratios to base; goal lines dashed). A run directory holds report.json and/or
eval/eval.json (what scripts/gpu_convert.sh bundles).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from linearize.pipelines.results import write_table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories, one row each, in this order")
    ap.add_argument("--out", type=Path, required=True, help="where results.md / .json / .png go")
    ap.add_argument("--title", default=None)
    args = ap.parse_args(argv)
    try:
        rows = write_table(args.runs, args.out, args.title)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((args.out / "results.md").read_text())
    print(f"wrote {args.out / 'results.md'}, results.json" + (", results.png" if any(r.get("ratios") for r in rows) else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
