"""chunk._launch: a launch out of shared memory is retried with num_stages=1 (and remembered); one that
does not fit even then gets a one-line error that names the kernel and the way out."""

import dataclasses

import pytest
import torch

from tests.ops.helpers import needs_triton

pytestmark = needs_triton


class FakeKernel:
    """Records launches; raises Triton's OutOfResources when num_stages exceeds ``max_stages``."""

    __name__ = "fake_kernel"

    def __init__(self, max_stages: int):
        self.max_stages, self.calls = max_stages, []

    def __getitem__(self, grid):
        from triton.runtime.errors import OutOfResources

        def run(*args, num_stages, **kwargs):
            self.calls.append((grid, args, num_stages, kwargs))
            if num_stages > self.max_stages:
                raise OutOfResources(247552, 232448, "shared memory")

        return run


@pytest.fixture(autouse=True)
def fresh_memory(monkeypatch):
    from linearize.ops.triton import chunk

    monkeypatch.setattr(chunk, "_ONE_STAGE", set())


def test_fits_launches_once_with_its_stages():
    from linearize.ops.triton.chunk import _launch

    k = FakeKernel(max_stages=2)
    _launch(k, (3, 4), "x", 700, num_stages=2, num_warps=8, C=64)
    assert [(c[0], c[2]) for c in k.calls] == [((3, 4), 2)]


def test_out_of_shared_memory_retries_with_one_stage_and_remembers():
    from linearize.ops.triton.chunk import _launch

    k = FakeKernel(max_stages=1)
    _launch(k, (3, 4), "x", 700, num_stages=2, num_warps=8, C=64)
    assert [c[2] for c in k.calls] == [2, 1]
    assert k.calls[1][1] == ("x", 700) and k.calls[1][3] == {"num_warps": 8, "C": 64}
    _launch(k, (5, 4), "y", 701, num_stages=2, num_warps=8, C=64)  # same compile class: straight to 1 stage
    assert [c[2] for c in k.calls] == [2, 1, 1]
    _launch(k, (5, 4), "y", 1, num_stages=2, num_warps=8, C=64)  # T == 1 compiles apart: tried again
    assert [c[2] for c in k.calls] == [2, 1, 1, 2, 1]
    _launch(k, (5, 4), "y", 701, num_stages=2, num_warps=8, C=32)  # other constexprs: tried again
    assert [c[2] for c in k.calls][-2:] == [2, 1]


def test_too_big_even_with_one_stage_is_one_clear_line():
    from linearize.ops.triton.chunk import _launch

    k = FakeKernel(max_stages=0)
    with pytest.raises(RuntimeError) as info:
        _launch(k, (1,), 7, num_stages=2, num_warps=8, C=64)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("fake_kernel needs more shared memory")
    assert "LaunchConfig(C=32" in msg


@pytest.mark.parametrize("D", [16, 32, 64, 96, 128, 256])
@pytest.mark.parametrize("F", [32, 64, 128, 256])
def test_default_config_never_picks_value_blocks_narrower_than_the_chunk(D, F):
    from linearize.ops.triton.chunk import _check_blocks, default_config, value_block

    cfg = default_config(D, F)
    BV = value_block(cfg.BV, D)  # as the forward clamps it
    assert BV >= cfg.C
    _check_blocks(cfg.C, BV, torch.device("cuda"))  # (a device type check only: no GPU needed)


def test_value_blocks_narrower_than_the_chunk_are_refused_on_cuda_only():
    from linearize.ops.triton.chunk import _check_blocks

    with pytest.raises(ValueError, match=r"BV >= C, e.g. LaunchConfig\(C=32, BV=32"):
        _check_blocks(64, 32, torch.device("cuda"))
    _check_blocks(64, 32, torch.device("cpu"))  # the interpreter runs it right


@pytest.mark.parametrize("D,F,folded", [(128, 128, True), (64, 64, True), (64, 128, True), (96, 128, True),
                                        (256, 128, False), (128, 256, False), (32, 64, False), (16, 32, False)])
def test_default_config_folds_the_backward_at_chunk_64_only(D, F, folded):
    """C 64 (head dims 64-128) gets the folded backward on blocks of 32 rows, the launch the H100 timed fastest,
    and in training the split forward whose chunk sums that backward reuses (H200: faster forward+backward, slower
    forward alone), walked from zero in each segment (local_sums, H100: faster at 16K and 2K) on state tiles three
    stages deep (walk_tile, walk_stages), the backward's walk beside bwd_dq (overlap), the split forward's block
    kernel and bwd_dq in Gluon (gluon_fwd, gluon_dq: H100, faster at 16K, 2K and SmolLM2's heads); Gemma 3's D = 256
    (C 32, whose folded kernels spill) and the small heads (C = D < 64) stay one-pass."""
    from linearize.ops.triton.chunk import LaunchConfig, default_config

    cfg, train = default_config(D, F), default_config(D, F, training=True)
    assert cfg.fold_backward is folded and not cfg.split_forward
    assert (cfg.C_intra, cfg.warps_intra) == ((32, 4) if folded else (None, None))
    assert train.split_forward is folded and train.keeps_chunk_sums is folded
    assert train.skip_empty is folded and not cfg.skip_empty  # block pairs' empty parts skipped in training
    assert train.local_sums is folded and not cfg.local_sums  # chunk sums walked from zero a segment in training
    assert train.walk_tile == (64 if folded else None) and cfg.walk_tile is None  # the walks on state tiles
    assert train.walk_stages == (3 if folded else None) and cfg.walk_stages is None  # ... pipelined 3 deep
    assert train.overlap is folded and not cfg.overlap  # the gradient-sum walk beside bwd_dq in training
    assert not train.walk_pairs and train.maxnreg is None  # (timed no faster / slower)
    # the split forward's block kernel and bwd_dq in Gluon (sm_90; the Triton kernels elsewhere), not bwd_dk (slower)
    assert train.gluon_fwd == (128 if folded else None) and train.gluon_dq is folded and not train.gluon_dk
    assert cfg.gluon_fwd is None and not cfg.gluon_dq
    assert dataclasses.replace(train, split_forward=False, skip_empty=False, local_sums=False, walk_tile=None,
                               walk_stages=None, overlap=False, gluon_fwd=None, gluon_dq=False) == cfg
    LaunchConfig(**vars(cfg))  # a valid config (C_intra divides C)


def test_walk_tiles_take_one_segment_where_they_fill_the_sms():
    """With the split forward's walks on state tiles (walk_tile), nseg None gives one segment (no segment sums, no
    prefix) where a segment's tile programs fill the SMs, and the usual count (>= 8 programs an SM, >= 4 chunks a
    segment) where they do not; an explicit nseg is kept. (On CPU the interpreter counts 4 SMs.)"""
    from linearize.ops.triton.chunk import _segments

    cpu = torch.device("cpu")
    assert _segments(256, 4, cpu, None, whole=True) == (256, 1)
    assert _segments(256, 4, cpu, None) == (32, 8)  # (8 programs an SM without whole)
    assert _segments(16, 2, cpu, None, whole=True) == (4, 4)  # too few programs: segments, at least 4 chunks each
    assert _segments(256, 4, cpu, 3, whole=True) == (86, 3)


def test_one_segment_only_where_every_walk_is_on_tiles():
    """_geometry: split + fold with walk_tile takes one segment where the tiles fill the (interpreter's 4) SMs; the
    split forward alone (its backward walks on [F, BV], a program a segment) and fold alone (the one-pass forward's
    walk) keep their segments."""
    from linearize.ops.triton.chunk import LaunchConfig, _geometry

    q = torch.zeros(2, 640, 2, 32)
    pq = torch.zeros(2, 640, 2, 32)
    for split, fold, one in [(True, True, True), (True, False, False), (False, True, False)]:
        cfg = LaunchConfig(C=16, BV=32, num_warps=4, split_forward=split, fold_backward=fold, walk_tile=16)
        nseg = _geometry(q, q, pq, pq, 64, cfg)[-1]
        assert (nseg == 1) is one, (split, fold, nseg)
