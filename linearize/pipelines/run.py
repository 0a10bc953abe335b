"""One conversion run: base eval -> convert -> attention transfer -> LoRA -> export + report. Resumable.

Layout of ``out``::

    config.yaml            the resolved settings (a resumed run must match them)
    state.json             finished evaluations, samples and stages
    metrics.jsonl          one line per optimizer step
    checkpoints/           atomic training checkpoints + LATEST
    stage1_final.safetensors   trained feature maps and window weights
    model/                 the exported linearized model (LoRA merged), loads with from_pretrained
    adapter/               the LoRA adapters, if lora.keep_adapters
    report.json, report.md, plots/*.png
"""

from __future__ import annotations

import dataclasses
import functools
import json
import platform
import resource
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from safetensors.torch import load_file, save_file

from ..convert import convert
from .checkpoint import CheckpointManager, atomic_write_json, atomic_write_text
from .config import RunConfig, config_from_dict
from .evaluate import perplexity, sample
from .finetune import add_lora, lm_loss, lora_parameters
from .report import plot_losses, write_report
from .trainer import train_stage, truncate_metrics
from .transfer import freeze_for_transfer, set_mode, transfer_loss


def make_logger(kind: str | None, out: Path) -> Callable[[dict], None] | None:
    """Mirror metrics to wandb or tensorboard, only when asked for (and installed)."""
    if kind is None:
        return None
    if kind == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise RunError("logger=tensorboard needs the tensorboard package: pip install tensorboard") from None
        writer = SummaryWriter(str(out / "tensorboard"))
        return lambda r: [writer.add_scalar(f"{r['stage']}/{k}", v, r["step"]) for k, v in r.items() if k not in ("stage", "step")]
    if kind == "wandb":
        try:
            import wandb
        except ImportError:
            raise RunError("logger=wandb needs the wandb package: pip install wandb") from None
        run = wandb.init(project="linearize", dir=str(out), resume="allow")
        return lambda r: run.log({f"{r['stage']}/{k}": v for k, v in r.items() if k != "stage"})
    raise RunError(f"unknown logger {kind!r}: choose tensorboard or wandb")


class RunError(RuntimeError):
    """A run that cannot start or continue as asked; the message says what to do."""


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("device=cuda was asked for but CUDA is not available; use --set device=cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _prepare_out(cfg: RunConfig, out: Path, resume: bool) -> dict[str, Any]:
    cfg_path = out / "config.yaml"
    if cfg_path.exists():
        if not resume:
            raise RunError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
        saved = config_from_dict(yaml.safe_load(cfg_path.read_text()))
        if saved != cfg:
            raise RunError(f"the settings differ from the run saved in {out}; resume with the same settings or use another --out")
        state_path = out / "state.json"
        return json.loads(state_path.read_text()) if state_path.exists() else {}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg_path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return {}


def run_conversion(
    cfg: RunConfig,
    out: str | Path,
    *,
    resume: bool = False,
    model_loader: Callable | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or resume) a whole conversion and return the report dict."""
    from .. import data as data_lib
    from ..models import load as load_model

    t_start = time.perf_counter()
    out = Path(out)
    state = _prepare_out(cfg, out, resume)
    # wall time over every segment of a resumed run: earlier segments' time is kept in state.json
    before = state.get("wall_seconds_before", 0.0) + state.pop("wall_seconds_segment", 0.0)
    state["wall_seconds_before"] = before

    def save_state() -> None:
        state["wall_seconds_segment"] = time.perf_counter() - t_start
        atomic_write_json(out / "state.json", state)

    state.setdefault("evals", {})
    state.setdefault("samples", {})
    state.setdefault("stages", {})
    device = pick_device(cfg.device)
    logger = make_logger(cfg.logger, out)
    torch.manual_seed(cfg.seed)

    echo(f"loading {cfg.model} ...")
    model, tokenizer = (model_loader or load_model)(cfg.model, dtype=torch.float32 if device.type == "cpu" else torch.bfloat16)
    model.to(device)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and cfg.data.seq_len > max_pos:
        raise RunError(f"data.seq_len={cfg.data.seq_len} is longer than the model takes (max_position_embeddings={max_pos})")

    echo(f"preparing data {cfg.data.source!r} at {cfg.data.seq_len} tokens ...")
    splits = data_lib.build_dataset(
        cfg.data.source, tokenizer, cfg.data.seq_len, val_fraction=cfg.data.val_fraction, seed=cfg.seed,
        max_val_tokens=cfg.data.val_tokens,
    )
    train_rows, val_rows = splits.train, splits.val
    if train_rows.shape[0] == 0 or val_rows.shape[0] == 0:
        raise RunError(f"data {cfg.data.source!r} gives {train_rows.shape[0]} train / {val_rows.shape[0]} validation rows of {cfg.data.seq_len} tokens; use more text or a shorter data.seq_len")
    total_params = sum(p.numel() for p in model.parameters())

    def evaluate(key: str, m) -> None:
        if key not in state["evals"]:
            state["evals"][key] = perplexity(m, val_rows, device, desc=f"eval {key}")
            save_state()
        e = state["evals"][key]
        echo(f"validation ppl [{key}]: {e['ppl']:.2f} (loss {e['loss']:.4f})")

    evaluate("base", model)
    if "base" not in state["samples"]:
        state["samples"]["base"] = sample(model, tokenizer, cfg.samples, cfg.sample_tokens, device)
        save_state()

    convert(model, cfg.linearize)
    model.to(device)
    evaluate("swapped", model)

    ckpts = CheckpointManager(out / "checkpoints")
    latest = ckpts.latest() if resume else None
    metrics = out / "metrics.jsonl"
    if latest is not None:
        truncate_metrics(metrics, latest.stage, latest.step, ("stage2",) if latest.stage == "stage1" else ())
        echo(f"resuming from {latest.stage} step {latest.step}")

    # ---- stage 1: attention transfer ---------------------------------------------------------------
    stage1_file = out / "stage1_final.safetensors"
    params = freeze_for_transfer(model)
    if device.type == "cuda":
        # bf16 weights cannot hold AdamW's small updates: train fp32 masters (autocast runs the math in bf16)
        for p in params.values():
            p.data = p.data.float()
    loss1 = transfer_loss
    if cfg.transfer_block is not None:
        a, b = cfg.transfer_block
        if b > model.config.num_hidden_layers:
            raise RunError(f"transfer_block={cfg.transfer_block} ends past the model's {model.config.num_hidden_layers} layers")
        in_block = {k for k in params if a <= int(k.split("layers.")[1].split(".")[0]) < b}
        for k in set(params) - in_block:
            params.pop(k).requires_grad_(False)
        loss1 = functools.partial(transfer_loss, block=(a, b))
    if "stage1" not in state["stages"]:
        if cfg.stage1.steps > 0:
            result = train_stage(
                "stage1", model, params, loss1, train_rows, cfg.stage1, seed=cfg.seed, checkpoints=ckpts,
                checkpoint_every=cfg.checkpoint_every, metrics_path=metrics, device=device, log=logger,
                resume_from=latest if latest is not None and latest.stage == "stage1" else None,
            )
            state["stages"]["stage1"] = _stage_record(result)
        else:
            state["stages"]["stage1"] = {"steps": 0, "tokens": 0, "seconds": 0.0, "final_loss": None, "trainable_params": 0}
        tmp = stage1_file.with_suffix(".tmp")
        save_file({k: p.detach().cpu().contiguous() for k, p in params.items()}, tmp)
        tmp.replace(stage1_file)
        save_state()
    else:
        weights = load_file(stage1_file)
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(weights[k].to(p.device, p.dtype))
    for p in params.values():
        p.requires_grad_(False)
    set_mode(model, "hybrid")
    evaluate("stage1", model)

    # ---- stage 2: LoRA -----------------------------------------------------------------------------
    if cfg.stage2.steps > 0:
        peft_model = add_lora(model, cfg.lora)
        lora_params = lora_parameters(peft_model)
        if "stage2" not in state["stages"]:
            result = train_stage(
                "stage2", peft_model, lora_params, lm_loss, train_rows, cfg.stage2, seed=cfg.seed + 1, checkpoints=ckpts,
                checkpoint_every=cfg.checkpoint_every, metrics_path=metrics, device=device, log=logger,
                resume_from=latest if latest is not None and latest.stage == "stage2" else None,
            )
            state["stages"]["stage2"] = _stage_record(result)
            save_state()
        else:
            last = ckpts.latest()
            weights = last.load_weights()
            with torch.no_grad():
                for k, p in lora_params.items():
                    p.copy_(weights[k].to(p.device, p.dtype))
        if cfg.lora.keep_adapters:
            peft_model.save_pretrained(out / "adapter")
        model = peft_model.merge_and_unload()
        evaluate("stage2", model)

    # ---- export and report --------------------------------------------------------------------------
    export = out / "model"
    tmp_export = out / ".model.tmp"
    model.save_pretrained(tmp_export)
    tokenizer.save_pretrained(tmp_export)
    if export.exists():
        shutil.rmtree(export)
    tmp_export.rename(export)
    if "linearized" not in state["samples"]:
        state["samples"]["linearized"] = sample(model, tokenizer, cfg.samples, cfg.sample_tokens, device)
        save_state()

    plots = [str(p.relative_to(out)) for p in plot_losses(metrics, out / "plots")]
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    import transformers

    report = {
        "model": cfg.model,
        "output": str(export),
        "environment": {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
                        "torch": torch.__version__, "transformers": transformers.__version__},
        "data": {"source": cfg.data.source, "seq_len": cfg.data.seq_len, "train_rows": int(train_rows.shape[0]), "val_rows": int(val_rows.shape[0])},
        "linearize": model.config.linearize,
        "total_params": total_params,
        "evals": state["evals"],
        "stages": state["stages"],
        "samples": state["samples"],
        "sample_prompts": cfg.samples,
        "plots": plots,
        "wall_seconds": state.get("wall_seconds_before", 0.0) + time.perf_counter() - t_start,
        "peak_memory_mb": peak,
        "config": cfg.to_dict(),
    }
    write_report(out, report)
    return report


def _stage_record(result) -> dict[str, Any]:
    rec = dataclasses.asdict(result)
    rec.pop("losses")
    return rec
