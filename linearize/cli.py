"""The ``linearize`` command line (typer + rich)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Turn pretrained LLMs into hybrid linear-attention LLMs.")
console = Console(stderr=True)


def _echo(message: str) -> None:
    console.print(f"[cyan]>[/] {escape(message)}")


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code=2)


def _prompt_ids(tokenizer, prompt: str, chat: bool):
    if chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    return tokenizer(prompt, return_tensors="pt")


def _stream(model, tokenizer, prompt: str, max_new_tokens: int, chat: bool = True) -> tuple[int, float]:
    """Greedy generation streamed to stdout; returns (new tokens, seconds)."""
    import torch
    from transformers import TextStreamer

    inputs = _prompt_ids(tokenizer, prompt, chat).to(model.device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer)
    return out.shape[1] - inputs["input_ids"].shape[1], time.perf_counter() - t0


def _state_bytes(model, seq_len: int, batch: int = 1) -> tuple[int, int]:
    """(KV-cache bytes of the base model, cache bytes of the linearized ``model``) at ``seq_len`` tokens, caches
    in bf16 (the sums in fp32; ``linearize.cache_bytes``)."""
    from .cache_bytes import base_layer_shapes, cache_bytes_per_sequence, layer_shapes

    return tuple(batch * cache_bytes_per_sequence(shapes, 2, seq_len) for shapes in (base_layer_shapes(model), layer_shapes(model)))


@app.command()
def demo(
    model: str = typer.Option("smollm2-135m", help="Alias, .gguf file, HF dir or hub id."),
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Run directory (resumed if it holds this demo)."),
    prompt: str = typer.Option("Write a short poem about the sea.", help="Prompt for the streamed generation."),
    max_new_tokens: int = typer.Option(48, help="Tokens to stream at the end."),
    set_: list[str] = typer.Option([], "--set", help="Override a cpu-demo setting, e.g. --set stage1.steps=10."),
) -> None:
    """The CPU demo: fetch MODEL, linearize it with the cpu-demo preset (attention transfer + LoRA),
    print the report (validation perplexity of base, swapped-untrained and linearized), stream a sample."""
    import torch

    from .pipelines.config import build_config
    from .pipelines.run import RunError, run_conversion

    t0 = time.perf_counter()
    try:
        cfg = build_config("cpu-demo", None, set_, model=model)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    console.rule(f"[bold]linearize demo[/]: {model} -> {out}")
    try:
        report = run_conversion(cfg, out, resume=(out / "config.yaml").exists(), echo=_echo)
    except (RunError, FileNotFoundError, ValueError, RuntimeError) as e:
        _fail(str(e))
    ev = report["evals"]
    table = Table(title=f"validation perplexity ({report['data']['source']}, {report['data']['seq_len']} tokens)")
    for col in ("model", "perplexity", "vs base"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for key, label in (("base", "base (softmax)"), ("swapped", "swapped, untrained"), ("stage1", "after attention transfer"), ("stage2", "linearized (final)")):
        if key in ev:
            table.add_row(label, f"{ev[key]['ppl']:.2f}", f"{ev[key]['ppl'] / ev['base']['ppl']:.2f}x")
    console.print(table)
    console.print(f"report: {out / 'report.md'}; model: {report['output']}")

    import linearize
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = AutoModelForCausalLM.from_pretrained(report["output"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(report["output"])
    assert linearize.is_linearized(lm)
    kv, state = _state_bytes(lm, 4096)
    console.print(f"decode cache per sequence at 4096 tokens: base KV {kv / 2**20:.1f} MiB vs linearized state {state / 2**20:.1f} MiB")
    console.rule(f"linearized {model}: greedy generation")
    with torch.no_grad():
        n, secs = _stream(lm, tokenizer, prompt, max_new_tokens)
    console.print(f"[dim]{n} tokens in {secs:.1f}s ({n / max(secs, 1e-9):.1f} tok/s); demo total {time.perf_counter() - t0:.0f}s[/]")


@app.command("convert")
def convert_cmd(
    model: str = typer.Argument(..., help="Alias (smollm2-135m, gemma3-270m, qwen2.5-coder-0.5b), .gguf file, HF dir or hub id."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory: checkpoints, metrics, report, exported model."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML file of settings."),
    set_: list[str] = typer.Option([], "--set", help="Override a setting, e.g. --set stage1.lr=1e-3 (repeatable)."),
    preset: Optional[str] = typer.Option(None, help="cpu-demo | full"),
    resume: bool = typer.Option(False, help="Continue the run saved in --out exactly where it stopped."),
    nproc: int = typer.Option(1, "--nproc", help="Processes per host (one per GPU): runs this command under torchrun.", rich_help_panel="Multi-GPU"),
    nnodes: str = typer.Option("1", "--nnodes", help="Hosts (torchrun --nnodes); >1 needs --rdzv-endpoint.", rich_help_panel="Multi-GPU"),
    rdzv_endpoint: Optional[str] = typer.Option(None, "--rdzv-endpoint", help="HOST:PORT of the rendezvous, the same on every host.", rich_help_panel="Multi-GPU"),
    rdzv_id: Optional[str] = typer.Option(None, "--rdzv-id", help="Job id shared by the hosts (default: linearize).", rich_help_panel="Multi-GPU"),
) -> None:
    """Linearize MODEL: attention transfer, then LoRA; writes OUT/model, OUT/report.md and checkpoints.

    Several processes: `--nproc N` (or `torchrun --nproc_per_node N -m linearize convert ...`) trains
    stage 1 block-wise (a block of layers per process) and stage 2 with FSDP2 data parallelism; by
    default no GPU holds the whole model (`--set placement=replicate` gives every process a full copy).

    Where a step's time goes: `LINEARIZE_PROFILE=10:3 linearize convert ...` profiles steps 10-12 of each
    stage and writes OUT/profile-<stage>-rank<r>.md.
    """
    import os

    from .pipelines.config import build_config
    from .pipelines.distributed import DistributedError
    from .pipelines.run import RunError, run_conversion
    from .pipelines.trainer import NonFiniteLossError

    try:
        cfg = build_config(preset, config, set_, model=model)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    if nproc > 1 or nnodes not in ("1", "1:1"):
        from .pipelines.launch import LaunchError, launch

        command = ["convert", model, "--out", str(out)] + (["--config", str(config)] if config else [])
        command += [a for item in set_ for a in ("--set", item)] + (["--preset", preset] if preset else []) + (["--resume"] if resume else [])
        try:
            launch(command, nproc, nnodes, rdzv_endpoint, rdzv_id)
        except LaunchError as e:
            _fail(str(e))
        return
    world = os.environ.get("WORLD_SIZE", "1")
    where = f"rank {os.environ.get('RANK', '?')}/{world}: " if world not in ("", "1") else ""  # which process says it
    try:
        report = run_conversion(cfg, out, resume=resume, echo=_echo)
    except (RunError, DistributedError, NonFiniteLossError, FileNotFoundError, ValueError) as e:
        _fail(where + str(e))
    if report:  # rank 0 (the others return an empty report)
        console.print((out / "report.md").read_text())
        console.print(f"[bold green]done[/]: {report['output']}")


from .eval.cli import eval_cmd  # noqa: E402  (the eval command lives with the eval suite)

app.command("eval")(eval_cmd)


@app.command()
def generate(
    model: str = typer.Argument(..., help="A linearized model dir (or any model linearize.models.load takes)."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt."),
    max_new_tokens: int = typer.Option(128, help="Tokens to generate."),
    chat: bool = typer.Option(True, help="Wrap the prompt in the tokenizer's chat template, if it has one."),
) -> None:
    """Stream a greedy generation from a (linearized) model."""
    import linearize

    try:
        lm, tokenizer = linearize.models.load(model)
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        _fail(str(e))
    n, secs = _stream(lm, tokenizer, prompt, max_new_tokens, chat=chat)
    console.print(f"[dim]{n} tokens in {secs:.1f}s[/]")


@app.command("retrieval-layers")
def retrieval_layers(
    model: str = typer.Argument(..., help="The base model: alias, .gguf file, HF dir or hub id."),
    keep: list[int] = typer.Option([3], "--keep", help="How many layers to keep softmax (repeatable: one row per value)."),
    window: int = typer.Option(64, help="The hybrid's window: the probe counts keys beyond it."),
    sinks: int = typer.Option(0, help="Windowed layers also see the first SINKS tokens (as LinearizeConfig.sink_tokens)."),
    length: int = typer.Option(1024, help="Passkey prompt length in tokens."),
    examples: int = typer.Option(16, help="Passkey examples (seeded)."),
    out: Path = typer.Option(Path("runs/retrieval-layers"), "--out", "-o", help="Writes MODEL.json, .md and .png here."),
    write_config: Path | None = typer.Option(None, "--write-config", help="Also write a YAML for `convert --config` that keeps the chosen layers softmax."),
    min_acc: float = typer.Option(0.5, "--min-acc", help="--write-config picks the fewest --keep layers whose window-only passkey reaches this (0-1)."),
    heads: bool = typer.Option(False, "--heads", help="Rank and keep KV heads instead of whole layers (LinearizeConfig.softmax_heads): a smaller KV cache for the same retrieval."),
    mqar: int = typer.Option(0, "--mqar", help="Also score every kept set on this many MQAR sequences (0: passkey only)."),
    rank_by: str = typer.Option("passkey", "--rank-by", help="Rank by the passkey probe, the MQAR probe (mass on the queried pair), or both (each over its max, summed)."),
    mqar_probe: int = typer.Option(20, "--mqar-probe", help="MQAR sequences (seed 1) for --rank-by mqar/both."),
) -> None:
    """Rank a base model's layers (or, with --heads, KV heads) by how much they retrieve beyond the window
    (passkey), and check keeping the top ones softmax: a choice for LinearizeConfig.softmax_layers (softmax_heads)."""
    import json

    import torch

    import linearize
    from linearize.pipelines import retrieval

    if not 0 <= min_acc <= 1:
        _fail(f"--min-acc must be between 0 and 1; got {min_acc}")
    if rank_by not in retrieval.RANK_BY:
        _fail(f"--rank-by must be one of {', '.join(retrieval.RANK_BY)}; got {rank_by!r}")
    if mqar_probe < 1:
        _fail(f"--mqar-probe must be at least 1; got {mqar_probe}")
    try:
        lm, tokenizer = linearize.models.load(model, dtype=torch.float32)
        res = retrieval.rank_and_check(lm.eval(), tokenizer, keep=keep, window=window, sinks=sinks, length=length, n=examples,
                                       heads=heads, mqar=mqar, rank_by=rank_by, mqar_probe_n=mqar_probe)
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        _fail(str(e))
    out.mkdir(parents=True, exist_ok=True)
    name = Path(model).name.removesuffix(".gguf") + ("-heads" if heads else "") + ("" if rank_by == "passkey" else f"-rank-{rank_by}")
    (out / f"{name}.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / f"{name}.md").write_text(retrieval.markdown(res, model))
    retrieval.plot(res, out / f"{name}.png", model, min_acc)
    console.print(retrieval.markdown(res, model))
    console.print(f"[dim]written: {out}/{name}.json, .md, .png[/]")
    if write_config is not None:
        write_config.parent.mkdir(parents=True, exist_ok=True)
        write_config.write_text(retrieval.config_yaml(res, model, min_acc))
        console.print(write_config.read_text().rstrip() + f"\n[dim]written: {write_config}[/]")


if __name__ == "__main__":
    app()
