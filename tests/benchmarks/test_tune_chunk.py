"""tune_chunk's candidate list (the timing itself needs CUDA)."""

import dataclasses

import pytest

from benchmarks.tune_chunk import ALL_SHAPES, candidates
from linearize.ops.triton.chunk import LaunchConfig, default_config

# A plain one-pass base, so that these tests follow the candidate logic, not default_config's table (whose C 64
# answer now carries C_intra and fold_backward, which the listed shapes leave off).
PLAIN = LaunchConfig(C=64, BV=128, num_warps=8, num_stages=2)


def test_a_folded_default_is_listed_first_and_its_one_pass_shape_apart():
    from linearize.ops.triton.chunk import default_config

    base = default_config(128, 128)
    assert base.fold_backward and base.C_intra == 32
    cands = candidates(base, "default", [0])
    assert cands == [base, LaunchConfig(C=64, BV=128, num_warps=8, num_stages=2)]


def test_default_first_then_each_shape_and_segment_count_once():
    base = PLAIN
    cands = candidates(base, "default,64x64x4x2", [0, 16, 32])
    assert cands[0] == base
    assert len(cands) == len(set(cands)) == 6
    assert LaunchConfig(C=64, BV=64, num_warps=4, num_stages=2, nseg=32) in cands
    assert {c.nseg for c in cands} == {None, 16, 32}


def test_all_shapes_with_the_default_segments():
    assert len(candidates(PLAIN, "all", [0])) == 1 + len(ALL_SHAPES)


def test_bad_shape_is_one_line_error():
    with pytest.raises(SystemExit, match="CxBVxWARPSxSTAGES"):
        candidates(PLAIN, "64x64", [0])


def test_one_acc_doubles_the_list():
    base = PLAIN
    cands = candidates(base, "default", [0, 16], one_acc=True)
    assert len(cands) == 4 and sum(c.one_acc for c in cands) == 2 and cands[0] == base


def test_intra_blocks_follow_each_shape_and_skip_blocks_that_do_not_divide_its_chunk():
    base = PLAIN  # C 64
    cands = candidates(base, "default,32x128x8x2", [0], intra=[(32, 4), (16, 2), (64, 4)])
    assert cands[0] == base
    assert [(c.C, c.C_intra, c.warps_intra) for c in cands[1:]] == [
        (64, 32, 4), (64, 16, 2), (64, 64, 4), (32, None, None), (32, 32, 4), (32, 16, 2)]


def test_intra_flag_parses_and_rejects_in_one_line():
    from benchmarks.tune_chunk import parse_intra

    assert parse_intra("32x4,16x2") == [(32, 4), (16, 2)] and parse_intra("") == []
    with pytest.raises(SystemExit, match="C_INTRAxWARPS"):
        parse_intra("32")


def test_forms_pair_with_every_intra_block():
    cands = candidates(PLAIN, "default", [0], intra=[(32, 4)], forms=["one-pass", "split+fold"])
    assert [(c.C_intra, c.split_forward, c.fold_backward) for c in cands] == [
        (None, False, False), (None, True, True), (32, False, False), (32, True, True)]
    with pytest.raises(SystemExit, match="--forms"):
        candidates(PLAIN, "default", [0], forms=["fused"])


def test_skip_pairs_every_config_with_its_skipping_twin():
    from benchmarks.tune_chunk import label

    base = default_config(128, 128, training=True)
    cands = candidates(base, "default", [0], intra=[(32, 4)], forms=["split+fold"], skip=True)
    assert cands[0] == base and base.skip_empty  # the training default skips (since 2026-12-06)
    plain = [c for c in cands if not c.skip_empty]
    assert sorted(cands, key=str) == sorted(plain + [dataclasses.replace(c, skip_empty=True) for c in plain], key=str)
    assert dataclasses.replace(base, skip_empty=True) in cands
    assert all(("skip" in label(c).split()) == c.skip_empty for c in cands)
    # without --skip every config takes the default's setting
    assert all(c.skip_empty for c in candidates(base, "default", [0], intra=[(32, 4)], forms=["split+fold"]))
    evaluation = default_config(128, 128)
    assert not any(c.skip_empty for c in candidates(evaluation, "default", [0], intra=[(32, 4)], forms=["one-pass"]))


def test_blocks_flag_gives_each_split_fold_config_its_kernels_own_blocks_once():
    from benchmarks.tune_chunk import parse_blocks

    own = parse_blocks("fwd64x8,dk32x4,dq64x8+split2")
    assert own == [{"fwd": (64, 8)}, {"dk": (32, 4)}, {"dq": (64, 8), "dk_launches": 2}]
    with pytest.raises(SystemExit, match="fwd\\|dq\\|dk ROWSxWARPS"):
        parse_blocks("fw64x8")
    base = default_config(128, 128, training=True)  # split + fold, every intra kernel on 32 x 4
    cands = candidates(base, "default", [0], intra=[(32, 4)], forms=["split+fold", "one-pass"], blocks=own)
    launched = [(c.blocks("fwd"), c.blocks("dq"), c.blocks("dk"), c.dk_launches, c.split_forward) for c in cands]
    assert len(set(launched)) == len(launched)  # 'dk32x4' on the 32 x 4 default is the default: listed once
    assert ((64, 8), (32, 4), (32, 4), 1, True) in launched
    assert ((32, 4), (64, 8), (32, 4), 2, True) in launched  # dq's blocks moved, fwd's and dk's kept
    assert not any(c.C_fwd or c.C_dk or c.dk_launches > 1 for c in cands if not c.split_forward)  # one-pass rows: none


def test_walk_adds_each_split_fold_config_with_each_walk_tile():
    from benchmarks.tune_chunk import label

    base = default_config(128, 128, training=True)
    cands = candidates(base, "default", [0, 1], intra=[(32, 4)], intra_only=True, forms=["split+fold"], walks=[0, 32])
    assert cands[0] == base and base.walk_tile == 64
    assert {(c.nseg, c.walk_tile) for c in cands} == {(n, t) for n in (None, 1) for t in (64, None, 32)}
    assert all(c.local_sums == base.local_sums for c in cands)  # (no effect at one segment: no twin without it)
    assert base.walk_stages == 3 and all(c.walk_stages == 3 for c in cands)  # (the default's walk pipeline kept)
    assert {label(c).removesuffix(" overlap gluon_fwd=128 gluon_dq").split()[-2] for c in cands if c.nseg is None} == {
        "walk=64", "walk=32", "local"}
    # one-pass configs have no chunk-sum walks to tile
    assert not any(c.walk_tile for c in candidates(default_config(128, 128), "default", [0], forms=["one-pass"],
                                                   walks=[64]))


def test_walk_opts_add_each_split_fold_config_with_pairs_and_stages():
    from benchmarks.tune_chunk import label, parse_walk_opts

    opts = parse_walk_opts("pairs,s2,pairs+s4")
    assert opts == [{"walk_pairs": True}, {"walk_stages": 2}, {"walk_pairs": True, "walk_stages": 4}]
    base = default_config(128, 128, training=True)
    cands = candidates(base, "default", [0], intra=[(32, 4)], intra_only=True, forms=["split+fold"], walk_opts=opts)
    assert cands[0] == base
    assert [(c.walk_pairs, c.walk_stages) for c in cands] == [(False, 3), (True, 3), (False, 2), (True, 4)]
    # (the training default's overlap and Gluon kernels kept)
    assert label(cands[3]).endswith(" pairs walk_stages=4 overlap gluon_fwd=128 gluon_dq")
    assert parse_walk_opts("r168,pairs+r128") == [{"maxnreg": 168}, {"walk_pairs": True, "maxnreg": 128}]
    assert parse_walk_opts("ov+w128") == [{"overlap": True, "walk_maxnreg": 128}]
    capped = candidates(base, "default", [0], intra=[(32, 4)], intra_only=True, forms=["split+fold"],
                        walk_opts=parse_walk_opts("ov+w128"))
    assert capped[1].overlap and capped[1].walk_maxnreg == 128
    assert label(capped[1]).endswith(" overlap walk_maxnreg=128 gluon_fwd=128 gluon_dq")
    assert parse_walk_opts("g,gd,ov+s2,noov") == [{"dgamma_in_dq": True, "delta_in_dq": False},
                                                  {"dgamma_in_dq": True, "delta_in_dq": True, "overlap": False},
                                                  {"overlap": True, "walk_stages": 2}, {"overlap": False}]
    gd = candidates(base, "default", [0], intra=[(32, 4)], intra_only=True, forms=["split+fold"],
                    walk_opts=parse_walk_opts("gd"))
    assert gd[1].dgamma_in_dq and gd[1].delta_in_dq and label(gd[1]).endswith(" dgamma_in_dq delta_in_dq gluon_fwd=128 gluon_dq")
    assert base.overlap and not gd[1].overlap  # (overlap's walk reads delta before bwd_dq: gd turns it off)
    assert parse_walk_opts("gl128,gl64+noov,gl128+gdq") == [{"gluon_fwd": 128}, {"gluon_fwd": 64, "overlap": False},
                                                            {"gluon_fwd": 128, "gluon_dq": True}]
    assert parse_walk_opts("nogl") == [{"gluon_fwd": None, "gluon_dq": False, "gluon_dk": 0}]
    triton = candidates(base, "default", [0], intra=[(32, 4)], intra_only=True, forms=["split+fold"],
                        walk_opts=parse_walk_opts("nogl,gl64"))  # (the Triton kernels beside the Gluon default)
    assert [(c.gluon_fwd, c.gluon_dq) for c in triton] == [(128, True), (None, False), (64, True)]
    assert label(triton[1]).endswith(" overlap") and label(triton[2]).endswith(" overlap gluon_fwd=64 gluon_dq")
    gdk = candidates(base, "default", [0], intra=[(32, 4)], intra_only=True, forms=["split+fold"],
                     walk_opts=parse_walk_opts("gdk,gdk3"))
    assert [c.gluon_dk for c in gdk] == [0, 1, 3]
    assert label(gdk[1]).endswith(" overlap gluon_fwd=128 gluon_dq gluon_dk=1") and label(gdk[2]).endswith("gluon_dk=3")
    # other forms drop what they do not run: no split forward, no Gluon forward; no folded backward, no Gluon bwd_dq
    other = candidates(base, "default", [0], intra=[(32, 4)], intra_only=True, forms=["one-pass", "fold"])
    assert [(c.gluon_fwd, c.gluon_dq) for c in other[1:]] == [(None, False), (None, True)]
    assert parse_walk_opts("gl128+gdq+gdk") == [{"gluon_fwd": 128, "gluon_dq": True, "gluon_dk": 1}]
    assert parse_walk_opts("gdk2,gdk3") == [{"gluon_dk": 2}, {"gluon_dk": 3}]
    with pytest.raises(SystemExit, match="walk-opts"):
        parse_walk_opts("pairs+s9")
