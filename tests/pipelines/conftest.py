"""Fixtures of the pipeline tests that run whole conversions on a tiny saved model (``tiny_run``)."""

import pytest

from .tiny_run import make_model_dir, make_text


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A cache of the test's own (``$LINEARIZE_CACHE``): tokenized data and runs neither read nor fill the user's.
    Modules take it with ``pytestmark = pytest.mark.usefixtures("own_cache")``."""
    monkeypatch.setenv("LINEARIZE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def setup(tmp_path):
    """(the tiny model's directory, a training text file)."""
    return make_model_dir(tmp_path / "tiny"), make_text(tmp_path / "text.txt")


@pytest.fixture
def setup_ood(setup, tmp_path):
    """``setup`` plus a text from another distribution, for out-of-domain perplexity."""
    return (*setup, make_text(tmp_path / "other.txt", paragraphs=40, seed=7))
