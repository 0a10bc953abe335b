"""The decode batch plot (benchmarks/gen_report.batch_plot, benchmarks/plot_decode.py) on synthetic results."""

import json

from benchmarks.gen_report import batch_plot
from benchmarks.plot_decode import main as plot_main


def _payload(model, batches, tok_s, fit=None):
    rows = [{"section": "decode", "model": model, "label": model, "loop": "lean", "graph": True, "batch": b,
             "new_tokens": 64, "tok_s": t, "peak_gib": 0.1 * b} for b, t in zip(batches, tok_s)]
    if fit:
        rows.append({"section": "fit", "model": model, "largest": fit})
    return {"environment": {"device": "test", "memory_gib": 80.0}, "args": {"prompt_len": 8}, "rows": rows}


def test_ours_and_the_base_from_two_files_in_one_plot(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_payload("ours", [1, 16, 64], [10.0, 150.0, 500.0], fit=600)))
    b.write_text(json.dumps(_payload("base", [1, 16, 64], [8.0, 100.0, 300.0], fit=90)))
    out = tmp_path / "p.png"
    assert plot_main([str(a), str(b), "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"


def test_nothing_to_plot_at_one_batch_and_bad_files_are_one_line_errors(tmp_path, capsys):
    assert batch_plot([_payload("ours", [64], [500.0])], tmp_path / "x.png") is None
    assert not (tmp_path / "x.png").exists()
    one = tmp_path / "one.json"
    one.write_text(json.dumps(_payload("ours", [64], [500.0])))
    assert plot_main([str(one), "--out", str(tmp_path / "y.png")]) == 2
    bad = tmp_path / "bad.json"
    bad.write_text("{trunc")
    assert plot_main([str(bad), "--out", str(tmp_path / "z.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "two or more batches" in err[0] and "not a readable benchmark result" in err[1]
