"""Carrying files to an offline machine in capped calls: the plan, and staging on the other side."""

import hashlib
import io
import json
import os
import tarfile

import pytest

from linearize.pipelines.carry import Item, plan_calls, stage, write_plan

MiB = 2**20


def _items(tmp_path, sizes, seed=0):
    items = []
    for i, size in enumerate(sizes):
        p = tmp_path / "src" / f"f{i}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(size) if seed is None else bytes((j * 7 + i) % 251 for j in range(size)))
        items.append(Item(f"dir/sub/f{i}.bin", p, size))
    return items


@pytest.mark.parametrize("sizes,capacity,reserved", [([10, 25, 3], 12, 4), ([100], 30, 0), ([5, 5, 5], 5, 0), ([1, 2, 40, 7], 9, 8)])
def test_plan_fills_calls_in_order_and_covers_every_byte(tmp_path, sizes, capacity, reserved):
    items = [Item(f"f{i}", tmp_path, s) for i, s in enumerate(sizes)]
    calls = plan_calls(items, capacity, first_reserved=reserved, min_piece=1)
    for n, call in enumerate(calls):
        room = capacity - (reserved if n == 0 else 0)
        assert 0 < sum(p.size for p in call) <= room
        if n < len(calls) - 1:  # only the last call may have room left
            assert sum(p.size for p in call) == room
    for item in items:
        pieces = [p for c in calls for p in c if p.rel == item.rel]
        assert [p.index for p in pieces] == list(range(len(pieces)))
        assert [p.offset for p in pieces] == [sum(q.size for q in pieces[:k]) for k in range(len(pieces))]
        assert sum(p.size for p in pieces) == item.size
    # the fewest calls for this order: total bytes over capacity, rounded up
    total = sum(sizes) + reserved
    assert len(calls) == -(-total // capacity)


def test_plan_does_not_open_a_call_for_a_crumb(tmp_path):
    items = [Item("a", tmp_path, 9), Item("b", tmp_path, 20)]
    calls = plan_calls(items, 10, min_piece=4)  # 1 byte left after "a": "b" starts in the next call
    assert [[(p.rel, p.size) for p in c] for c in calls] == [[("a", 9)], [("b", 10)], [("b", 10)]]
    with pytest.raises(ValueError, match="wheels"):
        plan_calls(items, 10, first_reserved=8, min_piece=4)


def _device_calls(tmp_path, plan_dir, n_calls):
    """Each call sees only its own call dir under .carry (what the device gets)."""
    for n in range(1, n_calls + 1):
        repo = tmp_path / f"device-call{n}"
        (repo / ".carry" / "gpu").mkdir(parents=True)
        os.symlink(plan_dir / f"call{n:02d}", repo / ".carry" / "gpu" / f"call{n:02d}")
        yield n, repo / ".carry"


def test_write_plan_then_stage_call_by_call(tmp_path):
    items = _items(tmp_path, [3000, 10_000, 777])
    calls = plan_calls(items, 4096, first_reserved=1000, min_piece=1)
    plan_dir = tmp_path / "repo" / ".carry" / "gpu"
    plan = write_plan(items, calls, plan_dir, repo=tmp_path / "repo")
    assert plan["calls"][0]["carry"] == [".carry/gpu/call01"]
    assert json.loads((plan_dir / "plan.json").read_text())["calls"][-1]["completes"]
    cache, stage_dir = tmp_path / "cache", tmp_path / "stage"
    for n, carry in _device_calls(tmp_path, plan_dir, len(calls)):
        res = stage(carry, stage_dir, cache, echo=lambda m: None)
        finished = {p.rel for c in calls[:n] for p in c if p.index == sum(q.rel == p.rel for cc in calls for q in cc) - 1}
        assert set(res["ready"]) == finished and not res["bad"]
    for item in items:
        assert (cache / item.rel).read_bytes() == item.path.read_bytes()
    assert not list(stage_dir.glob("*.part*"))  # joined files drop their pieces
    again = stage(tmp_path / "nothing", stage_dir, cache, echo=lambda m: None)  # idempotent, no carry at all
    assert sorted(again["ready"]) == sorted(i.rel for i in items)


def test_a_damaged_piece_is_caught_and_dropped(tmp_path):
    items = _items(tmp_path, [5000])
    calls = plan_calls(items, 2048, min_piece=1)
    plan_dir = tmp_path / "repo" / ".carry" / "gpu"
    write_plan(items, calls, plan_dir, repo=tmp_path / "repo")
    piece = next((plan_dir / "call02").glob("*.part01"))
    data = bytearray(piece.read_bytes())
    data[10] ^= 0xFF
    piece.write_bytes(bytes(data))
    msgs = []
    for _, carry in _device_calls(tmp_path, plan_dir, len(calls)):
        res = stage(carry, tmp_path / "stage", tmp_path / "cache", echo=msgs.append)
    assert res["bad"] == ["dir/sub/f0.bin"] and not (tmp_path / "cache" / "dir/sub/f0.bin").exists()
    assert any("sha256 mismatch" in m for m in msgs)
    assert not list((tmp_path / "stage").glob("*.part*"))  # all pieces dropped: the calls must be carried again


def test_bundles_are_unpacked_into_the_cache(tmp_path):
    payload = b"corpus text\n" * 100
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        info = tarfile.TarInfo("data/toy/documents.jsonl")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    src = tmp_path / "suite.tar.xz"
    src.write_bytes(buf.getvalue())
    items = [Item("carry/suite.tar.xz", src, src.stat().st_size)]
    plan_dir = tmp_path / "repo" / ".carry" / "gpu"
    write_plan(items, plan_calls(items, 10 * MiB), plan_dir, repo=tmp_path / "repo")
    res = stage(tmp_path / "repo" / ".carry", tmp_path / "stage", tmp_path / "cache", echo=lambda m: None)
    assert res["ready"] == ["carry/suite.tar.xz"]
    assert (tmp_path / "cache" / "data/toy/documents.jsonl").read_bytes() == payload
    assert (tmp_path / "cache" / "carry/suite.tar.xz.staged").read_text() == hashlib.sha256(buf.getvalue()).hexdigest()


def test_carry_prepare_format_without_digest_is_joined(tmp_path):
    """Pieces from scripts/carry_prepare.py (no .sha256) still join."""
    carry = tmp_path / ".carry"
    carry.mkdir()
    (carry / "gguf__m.gguf.part00").write_bytes(b"abc")
    (carry / "gguf__m.gguf.part01").write_bytes(b"def")
    (carry / "gguf__m.gguf.count").write_text("2")
    res = stage(carry, tmp_path / "stage", tmp_path / "cache", echo=lambda m: None)
    assert res["ready"] == ["gguf/m.gguf"] and (tmp_path / "cache" / "gguf/m.gguf").read_bytes() == b"abcdef"


@pytest.mark.parametrize("models_first", [False, True])
def test_prepare_orders_the_bundle_and_the_weights(tmp_path, monkeypatch, models_first):
    """--models-first puts the GGUF in the first calls (a weights-only benchmark can start earlier)."""
    import linearize.models.hub as hub
    import linearize.pipelines.carry as carry

    cache = tmp_path / "cache"
    (cache / "gguf").mkdir(parents=True)
    gguf = cache / "gguf" / "m.gguf"
    gguf.write_bytes(b"w" * (3 * MiB))
    monkeypatch.setattr(carry, "cache_root", lambda: cache)
    monkeypatch.setattr(carry, "build_bundle", lambda corpora, c, dst, with_eval=True: (dst.parent.mkdir(parents=True, exist_ok=True), dst.write_bytes(b"b" * MiB), dst)[2])
    monkeypatch.setattr(hub, "fetch_gguf", lambda m: gguf)
    monkeypatch.setitem(hub.ALIASES, "toy", hub.ALIASES[next(iter(hub.ALIASES))])
    monkeypatch.setattr(carry, "CALL_BYTES", 5 * MiB // 2)
    monkeypatch.setattr(carry, "MARGIN", 0)
    monkeypatch.setattr(carry, "tree_bytes", lambda repo: 0)
    plan = carry.prepare(["toy"], ["x"], tmp_path / "out", repo=tmp_path, whl=None, dry_run=True, models_first=models_first)
    first = [f["rel"] for f in plan["files"]]
    assert first == (["gguf/m.gguf", carry.BUNDLE] if models_first else [carry.BUNDLE, "gguf/m.gguf"])
    assert plan["calls"][0]["completes"] == ([] if models_first else [carry.BUNDLE])
    assert sum(c["bytes"] for c in plan["calls"]) == 4 * MiB
