"""``benchmarks/profile_decode.py``: the ring kernel launched for a profiler at a ``tune_decode`` preset."""

import pytest

from .helpers import run_interpreted


def test_runs_the_named_launch_on_the_interpreter_and_its_output_is_finite():
    """CPU under TRITON_INTERPRET=1 at the tiny preset, with deferred folding and a launch named by hand (S in
    16-row chunks): the warm-up and timed steps run on one ring, and every output element is written and finite."""
    out = run_interpreted("profile_decode.py", "--preset", "smoke", "--fold", "3", "--warmup", "1", "--steps", "3",
                          "--launch", "16,2,8,16,0,1", timeout=600)
    assert "smoke BD16 w2 BW8 FC16 H fold 3: 3 steps" in out and "y finite: True" in out, out


@pytest.mark.parametrize("text", ["16,2,8", "16,2,8,16,0,x", "a,b,c,d,e,f"])
def test_a_bad_launch_is_refused_with_its_form(text):
    from benchmarks.profile_decode import parse_launch

    with pytest.raises(SystemExit, match="BD,warps,BW,FC,prefetch,heads_dot"):
        parse_launch(text)
