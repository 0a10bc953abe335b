"""Split files into <64 MiB chunks under .carry/ for scripts/device_stage.sh (run here, not on the device).

    python scripts/carry_prepare.py gguf/SmolLM2-135M-Instruct.Q4_1.gguf data.tar.gz ...

Paths are relative to LINEARIZE_CACHE (default ~/.cache/linearize); they land at the same place under
~/lcache on the device. Chunks are numbered so each call can take a subset (see `carry` of the run tool).
"""

import os
import sys
from pathlib import Path

CHUNK = 47 * 2**20


def main() -> None:
    cache = Path(os.environ.get("LINEARIZE_CACHE", Path.home() / ".cache" / "linearize"))
    out = Path(".carry")
    out.mkdir(exist_ok=True)
    for rel in sys.argv[1:]:
        src = cache / rel
        name = rel.replace("/", "__")
        data = src.read_bytes()
        parts = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
        for i, part in enumerate(parts):
            (out / f"{name}.part{i:02d}").write_bytes(part)
        (out / f"{name}.count").write_text(str(len(parts)))
        print(f"{rel}: {len(data)} bytes in {len(parts)} parts")


if __name__ == "__main__":
    main()
