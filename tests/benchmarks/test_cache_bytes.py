"""scripts/cache_bytes.py: the decode cache a sequence holds, per layout, and its split."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))


def test_all_linear_rows_are_their_parts_and_per_kv_head_maps_shrink_the_state(tmp_path, capsys):
    import cache_bytes

    out = tmp_path / "c.md"
    assert cache_bytes.main(["--models", "smollm2-135m", "--tokens", "300", "--out", str(out)]) == 0
    rows = {}
    for line in out.read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 6 and cells[1].replace(".", "").isdigit():
            rows[cells[0]] = [float(c) if c.replace(".", "").isdigit() else c for c in cells[1:]]
    base = rows["base (KV cache, 30 layers)"][0]
    assert abs(base - 300 * 2 * 3 * 64 * 2 * 30 / 2**20) < 0.06  # 300 tokens of k and v, 3 KV heads of 64, 30 layers
    lin, kv = rows["all 30 linearized (smol-main)"], rows["all 30 linearized, key maps per KV head (abl-nope-kvmaps)"]
    assert abs(lin[0] - sum(lin[1:4])) < 0.11 and abs(kv[0] - sum(kv[1:4])) < 0.11  # no softmax layer: the parts are all
    assert kv[1] < lin[1] / 2.5 and kv[2] == lin[2] and kv[3] < lin[3] / 2.5  # 9 query heads a 3 KV heads
    assert "qwen" not in capsys.readouterr().out.lower()
