"""A benchmark run under the kernels' launch knobs says so in its environment stamp and its header."""

import os

from benchmarks.report import environment, header_lines


def test_launch_overrides_are_stamped_and_printed(monkeypatch):
    for k in [k for k in os.environ if k.startswith("LINEARIZE_")]:
        monkeypatch.delenv(k)
    env = environment("abc1234")
    assert env["overrides"] == {}
    assert not any("overrides" in ln for ln in header_lines(env, None, False))
    monkeypatch.setenv("LINEARIZE_DECODE_LAUNCH", "2,64")
    monkeypatch.setenv("LINEARIZE_DECODE_PREFETCH", "1")
    monkeypatch.setenv("LINEARIZE_CACHE", "/tmp/somewhere")
    env = environment("abc1234")
    assert env["overrides"] == {"LINEARIZE_DECODE_LAUNCH": "2,64", "LINEARIZE_DECODE_PREFETCH": "1"}
    lines = header_lines(env, None, True)
    assert "- environment overrides: LINEARIZE_DECODE_LAUNCH=2,64 LINEARIZE_DECODE_PREFETCH=1" in lines
