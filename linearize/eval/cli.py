"""``linearize eval``: a typer command function, registered by ``linearize/cli.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

TASKS_HELP = (
    "Comma-separated tasks: arc_easy, arc_challenge, piqa, hellaswag, winogrande, lambada, mmlu (5-shot), "
    "ppl:<corpus or file>[@len,...] (default 512,2048,4096), passkey[@len,...], mqar[@pairs,...]; "
    "'zeroshot' = the six zero-shot tasks, 'all' = everything."
)
ZEROSHOT = ["arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "lambada"]


def expand_tasks(spec: list[str]) -> list[str]:
    from .run import DEFAULT_TASKS

    out: list[str] = []
    for item in spec:
        parts: list[str] = []
        for x in (x.strip() for x in item.split(",")):
            if x.isdigit() and parts and "@" in parts[-1]:
                parts[-1] += f",{x}"  # "passkey@1024,2048": a number continues the previous task's list
            elif x:
                parts.append(x)
        for t in parts:
            expanded = ZEROSHOT if t == "zeroshot" else list(DEFAULT_TASKS) if t == "all" else [t]
            out += [x for x in expanded if x not in out]
    return out


def eval_cmd(
    models: list[str] = typer.Argument(..., help="Aliases, .gguf files, HF dirs (linearized or not) or hub ids; evaluated side by side."),
    tasks: list[str] = typer.Option(["zeroshot"], "--tasks", "-t", help=TASKS_HELP),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", help="Cap examples per task (per MMLU subject; windows for ppl)."),
    out: Path = typer.Option(Path("runs/eval"), "--out", "-o", help="Writes eval.json, eval.md and eval.png here."),
    device: str = typer.Option("auto", help="cuda, cpu or auto (CUDA when present)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Sequences per forward pass."),
    dtype: str = typer.Option("auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16 or float16."),
    seed: int = typer.Option(0, help="Seed of the passkey / MQAR examples."),
) -> None:
    """Evaluate one or several models side by side: lm-eval-style zero-shot tasks and MMLU,
    sliding-window perplexity, passkey retrieval and MQAR."""
    from rich.console import Console
    from rich.markup import escape

    from .report import markdown
    from .run import evaluate

    console = Console(stderr=True)
    try:
        report = evaluate(models, expand_tasks(tasks), limit, out, device, batch_size=batch_size, seed=seed, dtype=dtype,
                          echo=lambda m: console.print(f"[cyan]>[/] {escape(m)}"))
    except (ValueError, FileNotFoundError, ImportError, OSError) as e:
        console.print(f"[bold red]error:[/] {escape(str(e).splitlines()[0] if str(e) else type(e).__name__)}")
        raise typer.Exit(code=2)
    print(markdown(report))
    console.print(f"wrote {out / 'eval.json'}, {out / 'eval.md'}, {out / 'eval.png'}")
