"""The training loop both stages share: AdamW, schedule, accumulation, checkpoints, exact resume."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .checkpoint import CheckpointManager, rng_state, set_rng_state
from .config import StageConfig
from .distributed import SINGLE, Dist
from .profiling import StepProfiler

LossFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the last checkpoint is kept."""


@dataclass
class StageResult:
    name: str
    steps: int
    tokens: int
    seconds: float
    final_loss: float | None
    trainable_params: int
    losses: list[float] = field(default_factory=list)


def batch_rows(num_rows: int, step: int, micro: int, cfg: StageConfig, seed: int) -> torch.Tensor:
    """Row indices of one micro-batch: a seeded permutation per epoch, so the data position is the step."""
    per_step = cfg.batch_size * cfg.grad_accum
    start = step * per_step + micro * cfg.batch_size
    idx = torch.arange(start, start + cfg.batch_size)
    epoch = idx // num_rows
    out = torch.empty_like(idx)
    for e in epoch.unique().tolist():
        perm = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + e))
        sel = epoch == e
        out[sel] = perm[idx[sel] % num_rows]
    return out


def local_rows(rows: torch.Tensor, d: Dist) -> torch.Tensor:
    """This rank's contiguous share of one global micro-batch's row indices (data parallelism)."""
    if d.world == 1:
        return rows
    share = rows.shape[0] // d.world
    return rows[d.rank * share : (d.rank + 1) * share]


def clip_grad_norm(params: list[torch.Tensor], max_norm: float, parallel: str | None, d: Dist) -> None:
    """Clip by the norm of the whole model's gradient, as one process training everything would.

    ``parallel="layers"``: each rank holds the gradients of its own layers only, so the squared norms are
    summed over ranks. Data-parallel gradients (``"data"``) are either FSDP's DTensors, which clip_grad_norm_
    reduces itself, or DDP's all-reduced tensors, the same on every rank.
    """
    if parallel != "layers" or not d.enabled:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    grads = [p.grad for p in params if p.grad is not None]
    local = torch.nn.utils.get_total_norm(grads).float() if grads else torch.zeros((), device=d.device)
    total = d.all_reduce(local.to(d.device) ** 2, "sum").sqrt()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)


def _schedule(cfg: StageConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.scheduler == "cosine":
            span = max(cfg.steps - cfg.warmup_steps, 1)
            return 0.5 * (1 + math.cos(math.pi * min(step - cfg.warmup_steps, span) / span))
        return 1.0

    return factor


def train_stage(
    name: str,
    model: nn.Module,
    params: dict[str, nn.Parameter],
    loss_fn: LossFn,
    rows: torch.Tensor,
    cfg: StageConfig,
    *,
    seed: int,
    checkpoints: CheckpointManager,
    checkpoint_every: int,
    metrics_path: Path,
    device: torch.device,
    resume_from=None,
    log: Callable[[dict], None] | None = None,
    dist: Dist = SINGLE,
    parallel: str | None = None,
) -> StageResult:
    """Train ``params`` (name -> parameter) to minimise ``loss_fn`` over ``rows`` [N, L] for ``cfg.steps`` steps.

    With ``resume_from`` (a checkpoint of this stage) the weights, optimizer, schedule, RNG and data
    position are restored, so the run continues exactly as if it had not stopped.

    Several processes (``dist``): ``parallel="data"`` splits every global micro-batch into equal
    contiguous shares, one per rank, and FSDP or DDP averages the gradients, so a step equals one process's
    step over the whole batch; ``parallel="layers"`` gives every rank the whole batch and its own
    layers (``params`` holds only those), the loss being a sum over layers. Either way the logged loss
    and the clipping norm are those of the whole model on the whole batch. Only rank 0 logs.
    """
    if parallel not in (None, "data", "layers"):
        raise ValueError(f"unknown parallel mode {parallel!r}")
    if parallel == "data" and cfg.batch_size % dist.world:
        raise ValueError(
            f"{name}.batch_size={cfg.batch_size} does not split over {dist.world} processes: use a multiple of {dist.world} "
            f"(the global batch is shared out equally)"
        )
    reduce_op = "mean" if parallel == "data" else "sum"
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg))
    start = 0
    if resume_from is not None:
        extras = resume_from.restore(params, model, opt, dist)
        sched.load_state_dict(extras["scheduler"])
        set_rng_state(extras["rng"])
        start = resume_from.step
    trainable = sum(p.numel() for p in params.values())  # DTensor.numel() is the global count
    if parallel == "layers":
        trainable = sum(dist.all_gather_object(trainable))
    tokens_per_step = cfg.batch_size * cfg.grad_accum * rows.shape[1]
    losses: list[float] = []
    t0 = time.perf_counter()
    quiet = {} if dist.is_main else {"disable": True}  # (an explicit disable=False would override TQDM_DISABLE)
    bar = tqdm(total=cfg.steps, initial=start, desc=name, unit="step", dynamic_ncols=True, **quiet)
    model.train()
    loss_value = None
    # FSDP2 or DDP (replicate): reduce gradients once per step, at the last micro-batch (the first such module met
    # is the topmost; FSDP's sets its sub-units too)
    dp_root = next((m for m in model.modules() if hasattr(m, "set_requires_gradient_sync")), None)
    sync = dp_root.set_requires_gradient_sync if dp_root is not None else None
    profiler = StepProfiler(name, metrics_path.parent, dist.rank)  # LINEARIZE_PROFILE=START:COUNT, else off
    for step in range(start, cfg.steps):
        profiler.before(step)
        t_step = time.perf_counter()
        micro_losses = []
        for micro in range(cfg.grad_accum):
            idx = batch_rows(rows.shape[0], step, micro, cfg, seed)
            batch = rows[local_rows(idx, dist) if parallel == "data" else idx].to(device)
            if sync is not None:
                sync(micro == cfg.grad_accum - 1)
            loss = loss_fn(model, batch) / cfg.grad_accum
            micro_losses.append(loss.detach().float())
            loss.backward()
        # One host sync and one loss reduction per step, after the backward passes: a check before the backward
        # would stall the GPU between forward and backward, and a collective per micro-batch would hold every
        # rank at each one (a pipelined stage 1 could not overlap a rank's backward with the next rank's forward).
        # A non-finite loss still stops the run before the optimizer step.
        whole = torch.stack(micro_losses)
        if dist.enabled:
            whole = dist.all_reduce(whole, reduce_op)  # (per micro-batch, over ranks)
        total = whole.sum().item()
        if not math.isfinite(total):
            raise NonFiniteLossError(
                f"{name}: loss is {total} at step {step}; lower {name}.lr or check the data "
                f"(the last checkpoint in {checkpoints.root} is kept)"
            )
        if cfg.max_grad_norm:
            clip_grad_norm(list(params.values()), cfg.max_grad_norm, parallel, dist)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_value = total
        losses.append(total)
        dt = time.perf_counter() - t_step
        record = {"stage": name, "step": step + 1, "loss": total, "lr": sched.get_last_lr()[0], "tokens_per_s": tokens_per_step / dt}
        if dist.is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if log is not None:
                log(record)
        bar.set_postfix(loss=f"{total:.4g}", tok_s=f"{tokens_per_step / dt:.0f}")
        bar.update(1)
        profiler.after(step, last=step + 1 == cfg.steps)
        if (step + 1) % checkpoint_every == 0 or step + 1 == cfg.steps:
            checkpoints.save(
                name,
                step + 1,
                {k: p.detach() for k, p in params.items()},
                {"scheduler": sched.state_dict(), "rng": rng_state()},
                model=model,
                optimizer=opt,
            )
    bar.close()
    model.eval()
    return StageResult(
        name=name,
        steps=cfg.steps,
        tokens=cfg.steps * tokens_per_step,
        seconds=time.perf_counter() - t0,
        final_loss=loss_value,
        trainable_params=trainable,
        losses=losses,
    )


def truncate_metrics(metrics_path: Path, stage: str, step: int, later_stages: tuple[str, ...]) -> None:
    """On resume, drop metric lines written after the checkpoint we resume from (they will be redone)."""
    if not metrics_path.exists():
        return
    keep = []
    for line in metrics_path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by the kill
        if rec.get("stage") in later_stages or (rec.get("stage") == stage and rec.get("step", 0) > step):
            continue
        keep.append(line)
    metrics_path.write_text("".join(line + "\n" for line in keep))
