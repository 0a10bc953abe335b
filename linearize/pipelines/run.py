"""One conversion run: base eval -> convert -> attention transfer -> LoRA -> export + report. Resumable.

Layout of ``out``::

    config.yaml            the resolved settings (a resumed run must match them)
    state.json             finished evaluations, samples and stages
    metrics.jsonl          one line per optimizer step
    checkpoints/           atomic training checkpoints + LATEST
    stage1_final.safetensors   trained feature maps and window weights (and length exponents)
    model/                 the exported linearized model (LoRA merged), loads with from_pretrained
    adapter/               the LoRA adapters, if lora.keep_adapters
    report.json, report.md, plots/*.png
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import os
import platform
import resource
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from safetensors.torch import load_file, save_file

from ..convert import convert, linearized_layers
from . import distributed
from .checkpoint import CheckpointManager, atomic_write_json, atomic_write_text
from .fsdp import local_bytes, shard_model
from .profiling import ENV as PROFILE_ENV, parse_window
from .config import RunConfig, config_from_dict
from .distributed import SINGLE, Dist
from .evaluate import perplexity, sample
from .finetune import add_lora, lora_parameters, stage2_loss
from .compile import compiled_layers
from .placement import PipelinedTransferLoss, describe, device_bytes, place_span, stage1_spans
from .placement import resolve as resolve_placement
from .replicate import replicate_for_lora
from .report import plot_losses, write_report
from .trainer import train_stage, truncate_metrics
from .transfer import freeze_for_transfer, set_mode, transfer_loss

#: a run's trained stage-1 weights (maps, window weights, ...), beside its checkpoints
STAGE1_FILE = "stage1_final.safetensors"


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


def _prepare_out(cfg: RunConfig, out: Path, resume: bool, d: Dist = SINGLE) -> dict[str, Any]:
    cfg_path = out / "config.yaml"
    exists = cfg_path.exists()
    d.barrier()  # every rank has looked before rank 0 writes the config
    if exists:
        if not resume:
            raise RunError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
        saved = config_from_dict(yaml.safe_load(cfg_path.read_text()))
        # the placement may change on resume, as the process count may, and compile may: each gives the same run
        if dataclasses.replace(saved, placement=cfg.placement, compile=cfg.compile) != cfg:
            raise RunError(f"the settings differ from the run saved in {out}; resume with the same settings or use another --out")
        state_path = out / "state.json"
        return json.loads(state_path.read_text()) if state_path.exists() else {}
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cfg_path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    d.barrier()
    return {}


def _layer_of(name: str) -> int:
    return int(name.split("layers.")[1].split(".")[0])


def _transfer_params(model, device: torch.device) -> dict[str, torch.nn.Parameter]:
    """Freeze all but the attention-transfer weights; on CUDA train them as fp32 masters."""
    params = freeze_for_transfer(model)
    if device.type == "cuda":
        # bf16 weights cannot hold AdamW's small updates: train fp32 masters (autocast runs the math in bf16)
        for p in params.values():
            p.data = p.data.float()
    return params


def _copy_into(params: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(weights[k].to(p.device, p.dtype))


def run_conversion(
    cfg: RunConfig,
    out: str | Path,
    *,
    resume: bool = False,
    model_loader: Callable | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or resume) a whole conversion and return the report dict (``{}`` on ranks other than 0).

    Under torchrun (WORLD_SIZE > 1) every process runs this: evaluations are shared out by rows,
    stage 1 trains one contiguous block of layers per rank, stage 2 is data-parallel, and rank 0
    alone writes files, samples and exports.
    """
    d = distributed.setup(cfg.device)
    try:
        return _run(cfg, Path(out), resume, model_loader, echo if d.is_main else (lambda m: None), d)
    finally:
        distributed.teardown(d)


def _run(cfg: RunConfig, out: Path, resume: bool, model_loader: Callable | None, echo: Callable[[str], None], d: Dist) -> dict[str, Any]:
    from .. import data as data_lib
    from ..models import load as load_model

    t_start = time.perf_counter()
    try:
        cfg.check()
        parse_window(os.environ.get(PROFILE_ENV))  # a bad LINEARIZE_PROFILE fails here, not after the model loads
    except ValueError as e:
        raise RunError(str(e)) from None
    state = _prepare_out(cfg, out, resume, d)
    # wall time over every segment of a resumed run: earlier segments' time is kept in state.json
    before = state.get("wall_seconds_before", 0.0) + state.pop("wall_seconds_segment", 0.0)
    state["wall_seconds_before"] = before

    def save_state() -> None:
        state["wall_seconds_segment"] = time.perf_counter() - t_start
        if d.is_main:
            atomic_write_json(out / "state.json", state)

    state.setdefault("evals", {})
    state.setdefault("evals_ood", {})
    state.setdefault("samples", {})
    state.setdefault("stages", {})
    device = pick_device(cfg.device) if not d.enabled else d.device
    logger = make_logger(cfg.logger, out) if d.is_main else None
    torch.manual_seed(cfg.seed)
    if d.enabled:
        if cfg.stage2.steps > 0 and cfg.stage2.batch_size % d.world:
            raise RunError(
                f"stage2.batch_size={cfg.stage2.batch_size} does not split over {d.world} processes: use a multiple of "
                f"{d.world} (it is the global batch, shared out equally)"
            )
    elif cfg.placement == "sharded":
        echo("placement=sharded with one process: it holds the whole model")

    echo(f"loading {cfg.model} ...")
    load = model_loader or load_model
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    with d.main_first():  # rank 0 fetches and converts into the cache; the others then read it
        model, tokenizer = load(cfg.model, dtype=dtype)
    weight_bytes = memory = None
    if d.enabled and cfg.placement == "auto":  # the choice needs the model's size and the smallest rank's memory
        weight_bytes = local_bytes(model)  # (the whole model: it is loaded, not yet placed)
        memory = min(d.all_gather_object(device_bytes(device, int(os.environ.get("LOCAL_WORLD_SIZE", d.world)))))
    placement, why = resolve_placement(cfg.placement, d.world, weight_bytes, memory)
    sharded = placement == "sharded"
    state["placement"] = {"mode": placement} | {k: v for k, v in state.get("placement", {}).items() if k != "mode"}
    if d.enabled:
        how = ("stage 1 a pipeline of blocks of layers (each rank holds its block only), stage 2 FSDP2 data-parallel "
               "on shards built from the CPU; no device holds the whole model") if sharded else (
               "stage 1 block-wise over layers, stage 2 DDP data-parallel; every rank holds the whole model")
        echo(f"{d.world} processes on {device.type}, placement {placement} ({why}): {how}")
    if cfg.compile:
        echo("compile=true: the training stages run their decoder layers through torch.compile; each stage's first "
             "step holds the compiles (tens of seconds)")
    if not sharded:
        model.to(device)  # (sharded: the model stays on the CPU until it is placed or sharded)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and cfg.data.seq_len > max_pos:
        raise RunError(f"data.seq_len={cfg.data.seq_len} is longer than the model takes (max_position_embeddings={max_pos})")
    if d.enabled and cfg.stage1.steps > 0 and d.world > model.config.num_hidden_layers:
        distributed.split_blocks(list(range(model.config.num_hidden_layers)), d.world)  # fails early, before evaluating

    echo(f"preparing data {cfg.data.source!r} at {cfg.data.seq_len} tokens ...")
    with d.main_first():
        splits = data_lib.build_dataset(
            cfg.data.source, tokenizer, cfg.data.seq_len, val_fraction=cfg.data.val_fraction, seed=cfg.seed,
            max_val_tokens=cfg.data.val_tokens,
        )
    train_rows, val_rows = splits.train, splits.val
    if train_rows.shape[0] == 0 or val_rows.shape[0] == 0:
        raise RunError(f"data {cfg.data.source!r} gives {train_rows.shape[0]} train / {val_rows.shape[0]} validation rows of {cfg.data.seq_len} tokens; use more text or a shorter data.seq_len")
    ood_rows = _ood_rows(cfg, tokenizer, d) if cfg.data.eval_ood_source else None
    total_params = sum(p.numel() for p in model.parameters())

    def evaluate(key: str, m, shared: bool = True) -> None:
        """Validation perplexity (and out-of-domain, if asked for), shared out over the ranks (``shared``) or by
        this process alone; on a sharded model every rank joins every forward."""
        kw = {"dist": d if shared else SINGLE, "collective": sharded and shared}
        if key not in state["evals"]:
            state["evals"][key] = perplexity(m, val_rows, device, desc=f"eval {key}", **kw)
            save_state()
        if ood_rows is not None and key not in state["evals_ood"]:
            state["evals_ood"][key] = perplexity(m, ood_rows, device, desc=f"eval {key} (out of domain)", **kw)
            save_state()
        e = state["evals"][key]
        ood = f"; out of domain {state['evals_ood'][key]['ppl']:.2f}" if ood_rows is not None else ""
        echo(f"validation ppl [{key}]: {e['ppl']:.2f} (loss {e['loss']:.4f}){ood}")

    def samples(key: str, m) -> None:
        if key not in state["samples"]:
            if sharded:  # every rank steps the sharded model's generation together
                state["samples"][key] = sample(m, tokenizer, cfg.samples, cfg.sample_tokens, device, synced=True)
                save_state()
            elif d.is_main:  # generation is short and sequential: rank 0 alone, the others wait
                state["samples"][key] = sample(m, tokenizer, cfg.samples, cfg.sample_tokens, device)
                save_state()
            d.barrier()

    def missing(key: str, sample_key: str | None = None) -> bool:
        """Whether evaluation ``key`` (or samples ``sample_key``) is still to do (a sharded model is built only then)."""
        return (key not in state["evals"] or (ood_rows is not None and key not in state["evals_ood"])
                or (sample_key is not None and sample_key not in state["samples"]))

    stage1_file = out / STAGE1_FILE
    build = functools.partial(_build, cfg, load, dtype, device, stage1_file)  # a fresh CPU model, as asked
    if sharded:
        if missing("base", "base"):
            shard_model(model, d)  # the loaded CPU model, straight onto the devices in shards
            evaluate("base", model)
            samples("base", model)
        else:
            evaluate("base", model)  # (already done: only echoes it)
        del model
        _free(device)
        if cfg.convert:
            m = shard_model(build(converted=True), d) if missing("swapped") else None
            evaluate("swapped", m)
            del m
            _free(device)
    else:
        evaluate("base", model)
        samples("base", model)
        if cfg.convert:
            convert(model, cfg.linearize)
            model.to(device)
            evaluate("swapped", model)
    if not cfg.convert:
        echo("convert=false: the softmax control (no conversion, no attention transfer; stage 2 only)")

    ckpts = CheckpointManager(out / "checkpoints", dist=d)
    latest = ckpts.latest() if resume else None
    metrics = out / "metrics.jsonl"
    if latest is not None:
        if d.is_main:
            truncate_metrics(metrics, latest.stage, latest.step, ("stage2",) if latest.stage == "stage1" else ())
        echo(f"resuming from {latest.stage} step {latest.step}" + (f" (written by {latest.world_size} processes)" if latest.world_size != d.world else ""))

    # ---- stage 1: attention transfer ---------------------------------------------------------------
    if cfg.stage1_from is not None and "stage1" not in state["stages"]:
        names = freeze_for_transfer(build(converted=True) if sharded else model)
        record = _adopt_stage1(cfg.stage1_from, out, stage1_file, {k: tuple(p.shape) for k, p in names.items()}, d)
        echo(f"stage 1 from {record['from']} ({record['steps']} steps there)")
        state["stages"]["stage1"] = record
        save_state()
    if cfg.convert and sharded:  # the softmax control (convert=false) has no stage 1
        if "stage1" not in state["stages"]:
            if cfg.stage1.steps > 0:
                result, held = _stage1_pipelined(cfg, load, dtype, device, train_rows, ckpts, latest, metrics, logger, d, stage1_file, echo)
                state["stages"]["stage1"] = _stage_record(result)
                state["placement"]["stage1"] = held
            else:
                state["stages"]["stage1"] = {"steps": 0, "tokens": 0, "seconds": 0.0, "final_loss": None, "trainable_params": 0}
                if d.is_main:
                    _save_stage1(stage1_file, _trained_params(build(converted=True), cfg, device)[1])
            save_state()
            d.barrier()
        if cfg.stage2.steps == 0 and missing("stage1", "linearized"):
            m = shard_model(build(converted=True, trained=True), d)
            evaluate("stage1", m)
            samples("linearized", m)
            del m
            _free(device)
        elif cfg.stage2.steps == 0:
            evaluate("stage1", None)
    elif cfg.convert:
        all_params, params = _trained_params(model, cfg, device)
        block = tuple(cfg.transfer_block) if cfg.transfer_block is not None else None
        loss1 = transfer_loss if block is None else functools.partial(transfer_loss, block=block)
        mine, parallel1 = params, None
        if d.enabled and "stage1" not in state["stages"] and cfg.stage1.steps > 0:
            # block-wise across ranks: each rank trains one contiguous block of the trained layers on the whole batch
            trained_ids = sorted({layer.layer_idx for layer in linearized_layers(model)} & {_layer_of(k) for k in params})
            blocks = distributed.split_blocks(trained_ids, d.world)
            block = blocks[d.rank]
            mine = {k: p for k, p in params.items() if block[0] <= _layer_of(k) < block[1]}
            loss1, parallel1 = functools.partial(transfer_loss, block=block), "layers"
            echo(f"stage 1 blocks of layers per rank: {[list(b) for b in blocks]}")
            d.broadcast_tensors(list(all_params.values()))  # one starting point whatever each rank's RNG did
        for k, p in all_params.items():
            p.requires_grad_(k in mine)
        if "stage1" not in state["stages"]:
            if cfg.stage1.steps > 0:
                with compiled_layers(model, cfg.compile):
                    result = train_stage(
                        "stage1", model, mine, loss1, train_rows, cfg.stage1, seed=cfg.seed, checkpoints=ckpts,
                        checkpoint_every=cfg.checkpoint_every, metrics_path=metrics, device=device, log=logger,
                        resume_from=latest if latest is not None and latest.stage == "stage1" else None,
                        dist=d, parallel=parallel1,
                    )
                state["stages"]["stage1"] = _stage_record(result)
                if d.enabled:  # stitch: every rank gets every block's trained weights
                    for part in d.all_gather_object({k: p.detach().cpu() for k, p in mine.items()}):
                        _copy_into({k: params[k] for k in part}, part)
            else:
                state["stages"]["stage1"] = {"steps": 0, "tokens": 0, "seconds": 0.0, "final_loss": None, "trainable_params": 0}
            if d.is_main:
                _save_stage1(stage1_file, params)
            save_state()
            d.barrier()
        else:
            _copy_into(params, load_file(stage1_file))
        for p in all_params.values():
            p.requires_grad_(False)
        set_mode(model, "hybrid")
        evaluate("stage1", model)

    # ---- stage 2: LoRA -----------------------------------------------------------------------------
    if sharded:
        weights = None
        if cfg.stage2.steps > 0:
            weights, held = _stage2_sharded(cfg, state, save_state, evaluate, samples, build, train_rows, ckpts, latest, metrics, logger, d)
            state["placement"]["stage2"] = held
        peaks = d.all_gather_object(_peak_mb(device))
        if not d.is_main:  # rank 0 alone merges and exports, on its CPU; the others wait
            d.barrier()
            return {}
        model = build(converted=cfg.convert, trained=cfg.convert, lora=weights is not None)  # on the CPU
        if weights is not None:
            _copy_into(lora_parameters(model), weights)
            if cfg.lora.keep_adapters:
                model.save_pretrained(out / "adapter")
            model = model.merge_and_unload()
    elif cfg.stage2.steps > 0:
        peft_model = add_lora(model, cfg.lora)
        lora_params = lora_parameters(peft_model)
        if "stage2" not in state["stages"]:
            if d.enabled:  # the replicate placement: DDP over all ranks (:mod:`.replicate`)
                d.broadcast_tensors(list(lora_params.values()))  # one LoRA initialisation on every rank
                replicate_for_lora(peft_model, d)
            with compiled_layers(peft_model, cfg.compile):
                result = train_stage(
                    "stage2", peft_model, lora_params, stage2_loss(cfg.stage2_loss, cfg.compile), train_rows, cfg.stage2, seed=cfg.seed + 1,
                    checkpoints=ckpts, checkpoint_every=cfg.checkpoint_every, metrics_path=metrics, device=device, log=logger,
                    resume_from=latest if latest is not None and latest.stage == "stage2" else None, dist=d, parallel="data",
                )
            state["stages"]["stage2"] = _stage_record(result)
            save_state()
        elif d.is_main:
            _copy_into(lora_params, ckpts.latest().load_weights())
        peaks = d.all_gather_object(_peak_mb(device))
        if not d.is_main:  # rank 0 alone evaluates, exports and samples, on the trained model it holds
            del peft_model, lora_params, model
            _free(device)
            d.barrier()
            return {}
        if cfg.lora.keep_adapters:
            peft_model.save_pretrained(out / "adapter")
        model = peft_model.merge_and_unload()
        evaluate("stage2", model, shared=False)
    else:
        peaks = d.all_gather_object(_peak_mb(device))
        if not d.is_main:
            d.barrier()
            return {}

    # ---- export and report (rank 0) -----------------------------------------------------------------
    export = out / "model"
    tmp_export = out / ".model.tmp"
    model.save_pretrained(tmp_export)
    tokenizer.save_pretrained(tmp_export)
    if export.exists():
        shutil.rmtree(export)
    tmp_export.rename(export)
    if "linearized" not in state["samples"]:  # (sharded: sampled on the shards already; the model here is on the CPU)
        state["samples"]["linearized"] = sample(model, tokenizer, cfg.samples, cfg.sample_tokens, next(model.parameters()).device)
        save_state()

    plots = [str(p.relative_to(out)) for p in plot_losses(metrics, out / "plots")]
    import transformers

    report = {
        "model": cfg.model,
        "output": str(export),
        "environment": {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
                        "torch": torch.__version__, "transformers": transformers.__version__, "processes": d.world,
                        "placement": placement, "placement_reason": why, "compiled_layers": cfg.compile},
        "data": {"source": cfg.data.source, "seq_len": cfg.data.seq_len, "train_rows": int(train_rows.shape[0]), "val_rows": int(val_rows.shape[0])},
        "convert": cfg.convert,
        "linearize": getattr(model.config, "linearize", None),  # None: the softmax control
        "total_params": total_params,
        "evals": state["evals"],
        "evals_ood": state["evals_ood"],
        "stages": state["stages"],
        "samples": state["samples"],
        "sample_prompts": cfg.samples,
        "plots": plots,
        "wall_seconds": state.get("wall_seconds_before", 0.0) + time.perf_counter() - t_start,
        "peak_memory_mb": _peak_mb(device),
        "peak_memory_mb_per_rank": peaks,  # each rank's peak before rank 0's export
        "placement": state["placement"],
        "config": cfg.to_dict(),
    }
    write_report(out, report)
    d.barrier()  # the other ranks waited for the export and the report
    return report


def _peak_mb(device: torch.device) -> float:
    """This process's peak memory: CUDA ``max_memory_allocated``, or the CPU peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _trained_params(model, cfg: RunConfig, device: torch.device) -> tuple[dict, dict]:
    """(all transfer weights, the ones stage 1 trains: all, or those of ``transfer_block``); freezes the rest."""
    all_params = _transfer_params(model, device)
    if cfg.transfer_block is None:
        return all_params, dict(all_params)
    a, b = cfg.transfer_block
    if b > model.config.num_hidden_layers:
        raise RunError(f"transfer_block={cfg.transfer_block} ends past the model's {model.config.num_hidden_layers} layers")
    return all_params, {k: p for k, p in all_params.items() if a <= _layer_of(k) < b}


def stage1_from_files(src: str, out: Path) -> tuple[list[Path], list[Path]]:
    """Where ``stage1_from=src`` may point for the run in ``out``: ``(the paths tried, the maps files of those
    that exist)``. A directory means its ``stage1_final.safetensors``; a relative path is tried from here,
    then beside ``out``. A file listed may not exist yet (a directory whose run is still in stage 1)."""
    given = Path(src).expanduser()
    tries = [given] if given.is_absolute() else [given, out.parent / given]
    return tries, [t / STAGE1_FILE if t.is_dir() else t for t in tries if t.exists()]


def _adopt_stage1(src: str, out: Path, stage1_file: Path, expected: dict[str, tuple], d: Dist) -> dict[str, Any]:
    """Copy another run's trained feature maps in as this run's stage 1 (``stage1_from``), after checking that
    they are exactly this model's transfer weights; returns the stage record (the source run's steps, tokens and
    loss, with ``from``), so the report counts the tokens those maps were trained on."""
    tries, files = stage1_from_files(src, out)
    if not files:
        raise RunError(f"stage1_from={src!r}: not found (looked at {', '.join(str(t) for t in tries)}); run that conversion first")
    file = next((f for f in files if f.is_file()), files[0])
    if not file.is_file():
        raise RunError(f"stage1_from={src!r}: {file} does not exist yet; that run has not finished its stage 1")
    try:
        weights = load_file(file)
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise RunError(f"stage1_from={src!r}: {file} is not a readable safetensors file ({e})") from None
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights) if tuple(weights[k].shape) != expected[k])
    if missing or extra or wrong:
        first = (missing or extra or wrong)[0]
        raise RunError(
            f"stage1_from={src!r}: its maps do not fit this model and linearize settings ({len(missing)} missing, "
            f"{len(extra)} extra, {len(wrong)} of another shape, e.g. {first}); use the run converted with the same settings"
        )
    if d.is_main:
        _save_stage1(stage1_file, weights)
    d.barrier()
    record = {"steps": 0, "tokens": 0, "seconds": 0.0, "final_loss": None, "trainable_params": sum(w.numel() for w in weights.values())}
    state_path = file.parent / "state.json"
    if state_path.exists():
        src_record = json.loads(state_path.read_text()).get("stages", {}).get("stage1")
        if src_record:
            record.update(src_record)
    return record | {"from": str(file)}


def _save_stage1(path: Path, params: dict[str, torch.Tensor]) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: p.detach().cpu().contiguous() for k, p in params.items()}, tmp)
    tmp.replace(path)


def _build(cfg: RunConfig, load: Callable, dtype: torch.dtype, device: torch.device, stage1_file: Path, *,
           converted: bool = False, trained: bool = False, lora: bool = False):
    """A fresh model on the CPU, frozen: the base, converted, with the stitched stage-1 weights (hybrid mode), with
    new LoRA adapters, as asked. ``device`` (where it will run) decides the dtype of the transfer weights."""
    model, _ = load(cfg.model, dtype=dtype)
    if converted:
        convert(model, cfg.linearize)
    if trained:
        params = _transfer_params(model, device)  # fp32 masters on CUDA, as the model that trained them
        weights = load_file(stage1_file)
        _copy_into({k: params[k] for k in weights}, weights)
        set_mode(model, "hybrid")
    for p in model.parameters():
        p.requires_grad_(False)
    return add_lora(model, cfg.lora) if lora else model


def _stage1_pipelined(cfg, load, dtype, device, train_rows, ckpts, latest, metrics, logger, d: Dist, stage1_file: Path, echo):
    """Sharded stage 1: each rank holds and runs only its span of layers, fed by the previous rank (see :mod:`.placement`).

    Returns the stage result and what each rank held (a list, one entry per rank); rank 0 writes the stitched weights.
    """
    model, _ = load(cfg.model, dtype=dtype)  # on the CPU (memory-mapped): only the span goes to the device
    convert(model, cfg.linearize)
    trained = set(_trained_params(model, cfg, device)[1])  # names only: the tensors of other spans go to meta
    trained_ids = sorted({layer.layer_idx for layer in linearized_layers(model)} & {_layer_of(k) for k in trained})
    blocks = distributed.split_blocks(trained_ids, d.world)
    spans = stage1_spans(blocks)
    echo(f"stage 1 pipeline: layers held per rank {[list(s) for s in spans]}, trained {[list(b) for b in blocks]}")
    span, block = spans[d.rank], blocks[d.rank]
    place_span(model, span, device, embeddings=d.rank == 0)
    all_params = _transfer_params(model, device)  # (again: placing made new meta tensors for the other spans)
    mine = {k: p for k, p in all_params.items() if k in trained and block[0] <= _layer_of(k) < block[1]}
    for k, p in all_params.items():
        p.requires_grad_(k in mine)
    loss = PipelinedTransferLoss(span, block, d, model.config.hidden_size, model.get_input_embeddings().weight.dtype)
    with compiled_layers(model, cfg.compile):
        result = train_stage(
            "stage1", model, mine, loss, train_rows, cfg.stage1, seed=cfg.seed, checkpoints=ckpts,
            checkpoint_every=cfg.checkpoint_every, metrics_path=metrics, device=device, log=logger,
            resume_from=latest if latest is not None and latest.stage == "stage1" else None, dist=d, parallel="layers",
        )
    held = describe(model, device) | {"rank": d.rank, "span": list(span), "block": list(block), "peak_mb": _peak_mb(device)}
    parts = d.all_gather_object({k: p.detach().cpu() for k, p in mine.items()})
    if d.is_main:  # stitch the blocks into one file
        _save_stage1(stage1_file, {k: v for part in parts for k, v in part.items()})
    held = d.all_gather_object(held)
    del model, all_params, mine, loss
    _free(device)
    return result, held


def _stage2_sharded(cfg, state, save_state, evaluate, samples, build, train_rows, ckpts, latest, metrics, logger, d: Dist):
    """Sharded stage 2: the LoRA model built on the CPU, sharded by FSDP2 onto the devices, trained, evaluated and
    sampled by all ranks together. Returns (the full adapter weights on rank 0's CPU, else None; what each rank held)."""
    peft_model = build(converted=cfg.convert, trained=cfg.convert, lora=True)
    d.broadcast_tensors(list(lora_parameters(peft_model).values()))  # one LoRA initialisation on every rank
    shard_model(peft_model, d)
    lora_params = lora_parameters(peft_model)  # now sharded DTensors, same names
    if cfg.convert:
        evaluate("stage1", peft_model)  # LoRA's B starts at zero: so far this is exactly the stage-1 model
    if "stage2" in state["stages"]:
        ckpts.latest().restore(lora_params, dist=d)  # DCP reads each rank's shards
    else:
        with compiled_layers(peft_model, cfg.compile):  # (each layer's FSDP2 hooks run outside its graph)
            result = train_stage(
                "stage2", peft_model, lora_params, stage2_loss(cfg.stage2_loss, cfg.compile), train_rows, cfg.stage2, seed=cfg.seed + 1,
                checkpoints=ckpts, checkpoint_every=cfg.checkpoint_every, metrics_path=metrics, device=d.device, log=logger,
                resume_from=latest if latest is not None and latest.stage == "stage2" else None, dist=d, parallel="data",
            )
        state["stages"]["stage2"] = _stage_record(result)
        save_state()
    evaluate("stage2", peft_model)
    samples("linearized", peft_model)
    held = d.all_gather_object({"rank": d.rank, "bytes_here": local_bytes(peft_model), "peak_mb": _peak_mb(d.device)})
    weights = {k: p.full_tensor().cpu() for k, p in lora_params.items()}  # a collective: every rank takes part
    del peft_model, lora_params
    _free(d.device)
    return (weights if d.is_main else None), held


def _ood_rows(cfg: RunConfig, tokenizer, d: Dist) -> torch.Tensor:
    """Validation rows of ``data.eval_ood_source``; it must share no source with the training data."""
    from .. import data as data_lib
    from ..data.build import parse_source

    ood, train = cfg.data.eval_ood_source, cfg.data.source
    trained = {(s.kind, s.fingerprint) for s in parse_source(train)}  # a file by its content, whatever its path
    shared = [s.value for s in parse_source(ood) if (s.kind, s.fingerprint) in trained]
    if shared:
        raise RunError(f"data.eval_ood_source={ood!r} shares {shared} with data.source={train!r}; choose text not used in training")
    with d.main_first():
        # one training row is the least build_dataset takes: the training side of this text is never used
        splits = data_lib.build_dataset(ood, tokenizer, cfg.data.seq_len, val_fraction=cfg.data.val_fraction, seed=cfg.seed,
                                        max_train_tokens=cfg.data.seq_len, max_val_tokens=cfg.data.val_tokens)
    if splits.val.shape[0] == 0:
        raise RunError(f"data.eval_ood_source={ood!r} gives no validation row of {cfg.data.seq_len} tokens; use more text or a shorter data.seq_len")
    return splits.val


def _stage_record(result) -> dict[str, Any]:
    rec = dataclasses.asdict(result)
    rec.pop("losses")
    return rec
