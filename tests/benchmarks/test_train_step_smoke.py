"""benchmarks/train_step.py runs its whole logic on CPU with a tiny model (the numbers mean nothing here)."""

import json

from tests.eval.helpers import tiny_byte_model_dir


def test_train_step_benchmark_cpu(tmp_path):
    from benchmarks.train_step import main

    model = tiny_byte_model_dir(tmp_path / "m")
    out = tmp_path / "out"
    s = main(["--model", str(model), "--device", "cpu", "--steps", "2", "--warmup", "1", "--profile", "1",
              "--batch", "2", "--seq-len", "40", "--linearize", '{"window": 8}', "--out", str(out)])
    one, two = s["stages"]
    # stage 1 trains the feature maps and window weights, stage 2 the LoRA adapters: different sets
    assert one["stage"] == 1 and two["stage"] == 2 and one["trainable_params"] != two["trainable_params"] > 0
    assert all(r["tokens_per_s"] > 0 and r["profile"]["top_host_ops"] for r in s["stages"])
    assert json.loads((out / "train_step.json").read_text())["stages"][0]["tokens_per_step"] == 80
    assert "| 1 | map kernel |" in (out / "train_step.md").read_text()


def test_map_kernel_both_gives_a_row_each(tmp_path):
    from benchmarks.train_step import main
    from linearize.modules.feature_maps import HedgehogFeatureMap

    model = tiny_byte_model_dir(tmp_path / "m")
    s = main(["--model", str(model), "--device", "cpu", "--steps", "1", "--warmup", "0", "--profile", "0", "--stages", "1",
              "--batch", "1", "--seq-len", "16", "--map-kernel", "both"])
    assert [(r["stage"], r["map_kernel"]) for r in s["stages"]] == [(1, True), (1, False)]
    assert HedgehogFeatureMap.kernel is True  # set back to what it was


def test_compile_both_gives_an_eager_and_a_compiled_row(tmp_path):
    from benchmarks.train_step import main

    model = tiny_byte_model_dir(tmp_path / "m")
    s = main(["--model", str(model), "--device", "cpu", "--steps", "1", "--warmup", "1", "--profile", "0", "--stages", "2",
              "--batch", "1", "--seq-len", "16", "--compile", "both", "--kl-weight", "0.5"])
    assert [(r["stage"], r["compiled"]) for r in s["stages"]] == [(2, False), (2, True)]
    assert all(r["first_step_s"] > 0 for r in s["stages"]) and s["kl_weight"] == 0.5
