"""Which attention layers retrieve from far back, and which to keep softmax (issue 6: passkey, MQAR).

A hybrid layer sees the last ``window`` keys exactly and everything older through a linear state, which
cannot hold a 5-digit pass key 1,000 tokens back. Keeping a few layers softmax is the issue's remedy; which
few matters. Two measurements on the **base** model, no training:

* ``probe``: the attention mass that the positions predicting the pass key put on the key's tokens in
  the needle, per layer and head, counted only where the needle lies beyond the window (what the linear
  part would have to serve). A layer's score is its best head's mass (one retrieval head is enough).
* ``window_only``: the passkey accuracy (greedy exact match) when every candidate layer except ``keep``
  attends to its last ``window`` keys only: the hybrid with a linear part that contributes nothing, a
  bound on what the kept layers carry alone.

With ``heads=True`` the unit is a KV head (its query heads' best mass) instead of a layer, for
``LinearizeConfig.softmax_heads``: the kept heads attend globally and every other head of every candidate
layer sees its window only (CPU, 12 examples at 1K, sinks 4: Qwen2.5-Coder-0.5B keeps passkey at 100% with
its top 3 KV heads of 48, where whole layers need 4 layers = 8 KV heads; SmolLM2-135M needs 20-30 of 90 KV
heads for 83-92%, where its top 10 layers = 30 KV heads give 75%).

``rank_by="mqar"`` ranks by a second probe, the mass that the positions predicting an MQAR answer put on the
queried pair's line; ``"both"`` sums the two, each over its largest (Qwen2.5-Coder-0.5B: the passkey top 3 KV
heads keep passkey and lose MQAR, the MQAR top 3 the reverse; ``results/issue6/README.md``).

    linearize retrieval-layers smollm2-135m --keep 3        # rank, then check the top 3 against even spacing
    linearize retrieval-layers qwen2.5-coder-0.5b --heads --keep 2 --keep 3 --keep 4
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..eval.recall import PASSKEY_DEPTHS, passkey_examples


@dataclass
class Example:
    ids: list[int]  # context + answer
    n_ctx: int  # context length: position n_ctx - 1 predicts the answer's first token
    key_pos: list[int]  # positions of the pass key's tokens inside the needle (both mentions)


def _find_all(seq: list[int], sub: list[int]) -> list[int]:
    n = len(sub)
    return [i for i in range(len(seq) - n + 1) if seq[i : i + n] == sub]


def examples(tokenizer, length: int, n: int, seed: int = 0, min_distance: int = 0) -> list[Example]:
    """``n`` passkey examples of ``length`` tokens whose needle ends at least ``min_distance`` tokens
    before the question (depths cycle over the eval's, the deepest dropped when too close)."""
    per_cell = max(1, -(-n // len(PASSKEY_DEPTHS)))
    out = []
    for ex in passkey_examples(tokenizer, (length,), PASSKEY_DEPTHS, per_cell, seed):
        ctx, ans = list(ex["context"]), list(ex["answer"])
        starts = _find_all(ctx, ans)
        if not starts:
            raise ValueError("the pass key's tokens were not found in the needle (tokenizer merges them differently)")
        key_pos = [s + j for s in starts for j in range(len(ans))]
        if len(ctx) - 1 - max(key_pos) < min_distance:
            continue
        out.append(Example(ctx + ans, len(ctx), key_pos))
    random.Random(seed).shuffle(out)
    if len(out) < n:
        raise ValueError(f"only {len(out)} passkey examples of {length} tokens put the needle {min_distance}+ tokens back; "
                         "use a longer --length")
    return out[:n]


def candidate_layers(model) -> list[int]:
    """The layers a conversion would linearize by default (``linearize.convert.selected_layers``): all but
    the model's own sliding-window ones."""
    from ..config import LinearizeConfig
    from ..convert import selected_layers
    from ..models import adapter_for

    return selected_layers(model, adapter_for(model.config.model_type), LinearizeConfig())


def _attention_modules(model) -> list[torch.nn.Module]:
    from ..models import adapter_for

    return [layer.self_attn for layer in adapter_for(model.config.model_type).decoder_layers(model)]


def _attention_mass(model, seqs: Sequence[tuple[list[int], list[tuple[list[int], list[int]]]]], window: int) -> torch.Tensor:
    """``mass [L, H]``: for each sequence (ids, targets), each target (rows, keys): the attention weight that the
    positions ``rows`` put on the positions ``keys`` more than ``window`` back, summed over keys, averaged over rows;
    averaged over targets, then sequences (eager attention, fp32 softmax, one sequence a forward)."""
    device = next(model.parameters()).device
    saved = model.config._attn_implementation
    model.set_attn_implementation("eager")
    total = None
    try:
        with torch.no_grad():
            for ids, targets in seqs:
                att = model(input_ids=torch.tensor([ids], device=device), output_attentions=True, use_cache=False).attentions
                m = 0
                for rows, keys in targets:
                    r, k = torch.tensor(rows, device=device), torch.tensor(keys, device=device)
                    far = (r[:, None] - k[None, :]) >= window  # beyond the window: the linear part's keys
                    m = m + torch.stack([(a[0][:, r][:, :, k].float() * far).sum(-1).mean(-1) for a in att])  # [L, H]
                m = m / len(targets)
                total = m if total is None else total + m
    finally:
        model.set_attn_implementation(saved)
    return (total / len(seqs)).cpu()


def probe(model, exs: Sequence[Example], window: int) -> torch.Tensor:
    """``mass [L, H]``: mean over examples and predicting positions of the attention weight on the pass
    key's tokens that lie more than ``window`` positions back (eager attention, fp32 softmax)."""
    return _attention_mass(model, [(ex.ids, [(list(range(ex.n_ctx - 1, len(ex.ids) - 1)), ex.key_pos)]) for ex in exs], window)


def mqar_probe(model, tokenizer, n: int, window: int, seed: int = 1) -> torch.Tensor:
    """``mass [L, H]`` of MQAR: the attention weight that the positions predicting each query's answer put on the
    queried pair's "key: value" line, where it lies more than ``window`` back; ``n`` sequences of 4 to 64 pairs
    (``linearize.eval.recall.mqar_sequences``; seed 1 by default, so not the sequences the suite scores)."""
    from ..eval.recall import mqar_sequences

    seqs, _ = mqar_sequences(tokenizer, limit=n, seed=seed, lines=True)
    return _attention_mass(model, [(ids, [(list(range(a - 1, b - 1)), list(range(s, e))) for (a, b), (s, e) in zip(spans, lines)])
                                   for ids, spans, lines in seqs], window)


RANK_BY = ("passkey", "mqar", "both")


def _heads(model) -> tuple[int, int]:
    """(query heads, KV heads) a layer."""
    H = model.config.num_attention_heads
    return H, getattr(model.config, "num_key_value_heads", None) or H


@contextlib.contextmanager
def window_only(model, layers: Sequence[int], window: int, sinks: int = 0,
                kept_heads: Sequence[Sequence[int]] = ()) -> Iterator[None]:
    """Within the block, the attention layers ``layers`` attend to their last ``window`` keys only, plus
    the first ``sinks`` tokens (StreamingLLM's attention sinks; ``LinearizeConfig.sink_tokens``): a banded
    causal mask replaces theirs (batch of one, no padding). ``kept_heads`` ([layer, kv_head] pairs): those
    KV heads' query heads keep the full causal mask (a per-head mask [B, H, T, T])."""
    mods = _attention_modules(model)
    H, Hkv = _heads(model)
    G = H // Hkv
    saved = {}

    def wrap(mod, kept: list[int]):
        fwd = mod.forward
        keep = torch.zeros(H, dtype=torch.bool)
        for h in kept:
            keep[h * G:(h + 1) * G] = True

        def forward(*args, **kwargs):
            h = kwargs.get("hidden_states", args[0] if args else None)
            T = h.shape[1]
            i = torch.arange(T, device=h.device)
            causal = i[:, None] >= i[None, :]
            band = causal & ((i[:, None] - i[None, :] < window) | (i[None, :] < sinks))
            if kept:
                m = torch.where(keep.to(h.device)[:, None, None], causal, band)
                kwargs["attention_mask"] = m[None].expand(h.shape[0], H, T, T)
            else:
                kwargs["attention_mask"] = band[None, None].expand(h.shape[0], 1, T, T)
            return fwd(*args, **kwargs)

        return fwd, forward

    try:
        for i in layers:
            saved[i], mods[i].forward = wrap(mods[i], [h for l, h in kept_heads if l == i])
        yield
    finally:
        for i, fwd in saved.items():
            mods[i].forward = fwd


def passkey_accuracy(model, exs: Sequence[Example]) -> float:
    """Greedy exact match of the pass key, scored as ``linearize.eval`` scores passkey, one unpadded
    request per forward (``window_only`` masks a batch of one)."""
    from ..eval.scoring import loglikelihood_tokens_reference

    res = loglikelihood_tokens_reference(model, [(ex.ids[: ex.n_ctx], ex.ids[ex.n_ctx :]) for ex in exs])
    return sum(greedy for _, greedy in res) / len(exs)


def evenly_spaced(candidates: Sequence[int], k: int) -> list[int]:
    """``k`` of ``candidates`` at the middles of ``k`` equal parts (SmolLM2's 30 layers, k=3: 5, 15, 25)."""
    n = len(candidates)
    return sorted({candidates[min(n - 1, int((j + 0.5) * n / k))] for j in range(k)}) if k else []


def rank_and_check(model, tokenizer, *, keep: Sequence[int] = (3,), window: int = 64, sinks: int = 0, length: int = 1024,
                   n: int = 16, seed: int = 0, compare: Sequence[Sequence[int]] = (), progress: bool = True,
                   heads: bool = False, mqar: int = 0, rank_by: str = "passkey", mqar_probe_n: int = 20) -> dict[str, Any]:
    """The probe's ranking, and the passkey accuracy with ``window_only`` on every candidate but the
    kept ones, for: the top k by the probe and ``evenly_spaced`` k, for each k in ``keep``; each list in
    ``compare``; none kept (all windowed) and all kept (the base). ``heads``: rank and keep KV heads
    ([layer, kv_head] pairs; no even spacing) instead of layers. ``mqar``: also score each set on that many
    MQAR sequences (``linearize.eval.recall.score_mqar``, seed 0: the suite's first ones), in ``mqar_acc``.
    ``rank_by``: the probe's score is the passkey mass, the MQAR mass (``mqar_probe`` on ``mqar_probe_n``
    sequences of another seed), or ``both``: the sum of the two, each divided by its largest unit's."""
    from tqdm.auto import tqdm

    from ..eval.recall import score_mqar

    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by must be one of {', '.join(RANK_BY)}; got {rank_by!r}")
    cands = candidate_layers(model)
    H, Hkv = _heads(model)
    units = [[i, h] for i in cands for h in range(Hkv)] if heads else list(cands)
    if max(keep, default=0) > len(units):
        what = "KV heads in the layers" if heads else "layers"
        raise ValueError(f"--keep {max(keep)}: the model has only {len(units)} {what} a conversion would linearize")
    exs = examples(tokenizer, length, n, seed, min_distance=window)
    masses = {}
    if rank_by != "mqar":
        masses["passkey"] = probe(model, exs, window)
    if rank_by != "passkey":
        masses["mqar"] = mqar_probe(model, tokenizer, mqar_probe_n, window)

    def unit_scores(mass: torch.Tensor) -> torch.Tensor:
        """[L, Hkv] (a KV head's best query head) or [L] (a layer's best head)."""
        return mass.view(mass.shape[0], Hkv, H // Hkv).max(-1).values if heads else mass.max(-1).values

    parts = {k: unit_scores(m) for k, m in masses.items()}
    # one probe: its own mass; both: each over its largest candidate's, summed (the two masses' scales differ)
    score = next(iter(parts.values())) if len(parts) == 1 else sum(p / p[cands].max().clamp_min(1e-12) for p in parts.values())
    mass = masses.get("passkey", masses.get("mqar"))  # best_head (layers) comes from the passkey mass if there is one
    sets = {}
    if heads:
        ranked = sorted(units, key=lambda u: -float(score[u[0], u[1]]))
        for k in keep:
            sets[f"probe top {k}"] = sorted(ranked[:k])
        for c in compare:
            sets.setdefault("given " + ",".join(f"{a}/{b}" for a, b in c), sorted(map(list, c)))
    else:
        ranked = sorted(cands, key=lambda i: -float(score[i]))
        for k in keep:
            sets |= {f"probe top {k}": sorted(ranked[:k]), f"evenly spaced {k}": evenly_spaced(cands, k)}
        for c in compare:
            sets.setdefault("given " + ",".join(map(str, c)), sorted(c))
    sets |= {"none kept (all windowed)": [], "all kept (base)": list(units)}
    acc, mqar_acc = {}, {}
    for name, kept in tqdm(sets.items(), desc="window-only passkey", disable=not progress, leave=False):
        ctx = window_only(model, cands, window, sinks, kept_heads=kept) if heads else \
            window_only(model, [i for i in cands if i not in kept], window, sinks)
        with ctx:
            acc[name] = passkey_accuracy(model, exs)
            if mqar:
                with torch.no_grad():  # right-padded batches: window_only's causal band never reaches the padding
                    mqar_acc[name] = score_mqar(model, tokenizer, limit=mqar, progress=False)["acc"]
    res = {"unit": "heads" if heads else "layers", "length": length, "window": window, "sinks": sinks, "examples": len(exs),
           "seed": seed, "candidates": cands, "rank_by": rank_by}
    if rank_by != "passkey":
        res["mqar_probe_examples"] = mqar_probe_n
    if heads:
        res["score_per_head"] = {f"{i}/{h}": float(score[i, h]) for i, h in units}
        res["scores_by_probe"] = {k: {f"{i}/{h}": float(p[i, h]) for i, h in units} for k, p in parts.items()}
    else:
        res |= {"score_per_layer": {i: float(score[i]) for i in cands}, "best_head": {i: int(mass[i].argmax()) for i in cands},
                "scores_by_probe": {k: {i: float(p[i]) for i in cands} for k, p in parts.items()}}
    res |= {"mqar_examples": mqar, "mqar_acc": mqar_acc} if mqar else {}
    return res | {"ranking": ranked, "keep": list(keep), "sets": sets, "passkey_acc": acc}


def choose(res: dict[str, Any], min_acc: float) -> tuple[int, list[int], bool]:
    """The smallest ``k`` in ``res['keep']`` whose probe top ``k`` keeps window-only passkey >= ``min_acc``:
    (k, its layers, True); the largest ``k`` when none does: (k, layers, False). The bound is pessimistic
    (the trained linear part also recalls: SmolLM2's top 10 scored 75% here and 100% at 4K once converted),
    so the default ``min_acc`` of the CLI is 0.5, not the goal's 0.9."""
    ks = sorted(res["keep"])
    for k in ks:
        if res["passkey_acc"][f"probe top {k}"] >= min_acc:
            return k, res["sets"][f"probe top {k}"], True
    return ks[-1], res["sets"][f"probe top {ks[-1]}"], False


def config_yaml(res: dict[str, Any], model_name: str, min_acc: float) -> str:
    """A LinearizeConfig override (YAML for ``--config``) keeping the chosen layers softmax."""
    k, layers, ok = choose(res, min_acc)
    heads = res.get("unit") == "heads"
    acc = res["passkey_acc"][f"probe top {k}"]
    why = (f"the fewest of --keep {','.join(map(str, res['keep']))} whose window-only passkey@{res['length']} reached "
           f"{100 * min_acc:.0f}% ({100 * acc:.0f}%)") if ok else (
           f"no --keep value reached {100 * min_acc:.0f}% window-only passkey@{res['length']}; the largest tried ({100 * acc:.0f}%)")
    import yaml

    key = "softmax_heads" if heads else "softmax_layers"
    body = {"linearize": {"window": res["window"], "sink_tokens": res["sinks"], key: layers}}
    rank = "" if res.get("rank_by", "passkey") == "passkey" else f" --rank-by {res['rank_by']}"
    head = (f"# linearize retrieval-layers {model_name}{' --heads' if heads else ''}{rank}: the probe's top {k} "
            f"{'KV heads' if heads else 'layers'} kept softmax;\n# {why}.\n")
    return head + yaml.safe_dump(body, default_flow_style=None, sort_keys=False)


def _shown(kept: list, heads: bool) -> str:
    if len(kept) > 12:
        return f"{len(kept)} {'KV heads' if heads else 'layers'}"
    return ", ".join(f"{a}/{b}" for a, b in kept) if heads else ", ".join(map(str, kept))


def _score_text(res: dict[str, Any]) -> str:
    """What the ranking score is, for the tables and plots."""
    passkey = "attention mass on the pass key's tokens from the positions that predict it"
    mqar = (f"attention mass on the queried pair's line from the positions that predict an MQAR answer "
            f"({res.get('mqar_probe_examples')} sequences, seed 1)")
    return {"passkey": passkey, "mqar": mqar,
            "both": f"{passkey}, plus its {mqar}, each divided by its largest"}[res.get("rank_by", "passkey")]


def _score_label(res: dict[str, Any], prefix: str) -> str:
    """The ranking score's axis label (``prefix``: "attention mass" or "mass")."""
    return {"passkey": f"{prefix} on the pass key", "mqar": f"{prefix} on the MQAR pair",
            "both": "passkey + MQAR mass (each / its max)"}[res.get("rank_by", "passkey")]


def markdown(res: dict[str, Any], model_name: str) -> str:
    heads = res.get("unit") == "heads"
    unit = "KV heads (layer/head)" if heads else "layers"
    lines = [f"# Retrieval {'heads' if heads else 'layers'}: {model_name}", "",
             f"Passkey at {res['length']} tokens, {res['examples']} examples (seed {res['seed']}), needle beyond the "
             f"window of {res['window']}" + (f" (windowed {'heads' if heads else 'layers'} also see the first {res['sinks']} tokens)" if res.get("sinks") else "")
             + ". Score: " + ("a KV head's best query head's" if heads else "the best head's") + " " + _score_text(res) + ".", "",
             f"| kept global (others see the window only) | {unit} | passkey acc |" + (" MQAR acc |" if res.get("mqar_acc") else ""),
             "|---|---|---:|" + ("---:|" if res.get("mqar_acc") else "")]
    for name, kept in res["sets"].items():
        mq = f" {100 * res['mqar_acc'][name]:.1f}% |" if res.get("mqar_acc") else ""
        lines.append(f"| {name} | {_shown(kept, heads) or '–'} | {100 * res['passkey_acc'][name]:.0f}% |{mq}")
    if res.get("mqar_acc"):
        lines.append(f"\nMQAR: the suite's first {res['mqar_examples']} sequences (4 to 64 pairs), greedy, per query.")
    if heads:
        lines += ["", "| rank | layer | KV head | score |", "|---:|---:|---:|---:|"]
        for r, (i, h) in enumerate(res["ranking"][:30], 1):
            lines.append(f"| {r} | {i} | {h} | {res['score_per_head'][f'{i}/{h}']:.3f} |")
        if len(res["ranking"]) > 30:
            lines.append(f"\n({len(res['ranking']) - 30} more KV heads in the JSON.)")
    else:
        lines += ["", "| rank | layer | score | best head |", "|---:|---:|---:|---:|"]
        for r, i in enumerate(res["ranking"], 1):
            lines.append(f"| {r} | {i} | {res['score_per_layer'][i]:.3f} | {res['best_head'][i]} |")
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path, model_name: str, min_acc: float = 0.5) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cands = res["candidates"]
    if res.get("unit") == "heads":
        _plot_heads(res, path, model_name, plt, min_acc)
        return
    top = set(res["sets"].get(f"probe top {res['keep'][0]}", [])) if res.get("keep") else set()
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(cands) + 2), 3.2))
    ax.bar(range(len(cands)), [res["score_per_layer"][i] for i in cands],
           color=["tab:red" if i in top else "tab:blue" for i in cands])
    ax.set_xticks(range(len(cands)), [str(i) for i in cands], fontsize=7)
    ax.set_xlabel("layer (red: kept softmax by the probe)")
    ax.set_ylabel(_score_label(res, "attention mass"))
    ax.set_title(f"{model_name}: retrieval beyond the window of {res['window']} (passkey @ {res['length']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_heads(res: dict[str, Any], path: Path, model_name: str, plt, min_acc: float) -> None:
    """Heat map layer x KV head of the scores; ``choose``'s kept set circled (the fewest top k that reach ``min_acc``)."""
    cands = res["candidates"]
    Hkv = 1 + max(h for _, h in res["ranking"])
    grid = [[res["score_per_head"][f"{i}/{h}"] for i in cands] for h in range(Hkv)]  # [Hkv, layers]
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(cands) + 2), 1.2 + 0.35 * Hkv))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0)
    k, kept, _ = choose(res, min_acc) if res.get("keep") else (0, [], False)
    for i, h in kept:
        ax.plot(cands.index(i), h, "o", ms=10, mfc="none", mec="red", mew=1.5)
    ax.set_xticks(range(len(cands)), [str(i) for i in cands], fontsize=7)
    ax.set_yticks(range(Hkv), [str(h) for h in range(Hkv)], fontsize=7)
    acc = res["passkey_acc"].get(f"probe top {k}", 0.0)
    ax.set_xlabel(f"layer (red: the probe's top {k} KV heads, window-only passkey {100 * acc:.0f}%)" if k else "layer")
    ax.set_ylabel("KV head")
    fig.colorbar(im, ax=ax, label=_score_label(res, "mass"))
    ax.set_title(f"{model_name}: retrieval beyond the window of {res['window']} (passkey @ {res['length']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
