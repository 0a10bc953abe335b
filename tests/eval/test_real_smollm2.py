"""The real check: SmolLM2-135M(-Instruct, dequantized GGUF) on 100 examples each of ARC-Easy, PIQA,
HellaSwag. Published (SmolLM2 model card, base 135M, lighteval): HellaSwag 42.1, PIQA 68.4,
ARC (easy+challenge average) 43.9; 100-example subsets have a standard error of about ±5 points."""

import pytest


@pytest.mark.slow
def test_smollm2_zero_shot_subset(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from linearize.eval import evaluate

    rep = evaluate(["smollm2-135m"], ["arc_easy", "piqa", "hellaswag"], limit=100, out=tmp_path, device="cpu", progress=False)
    res = rep["results"]["smollm2-135m"]
    print({t: {k: round(v, 3) for k, v in m.items() if k in ("acc", "acc_norm")} for t, m in res.items()}, rep["seconds"])
    assert res["arc_easy"]["acc"] > 0.45 and res["arc_easy"]["acc_norm"] > 0.40  # chance 0.25
    assert res["piqa"]["acc"] > 0.58 and res["piqa"]["acc_norm"] > 0.58  # chance 0.5
    assert res["hellaswag"]["acc_norm"] > 0.32  # chance 0.25
