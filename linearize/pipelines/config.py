"""Run configuration: nested dataclasses, presets, YAML files and ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import LinearizeConfig


@dataclass
class DataConfig:
    """Where the training text comes from and how it is cut."""

    source: str = "austen"  # a built-in corpus, a .txt/.jsonl path, hf:<dataset>, or several joined by '+'
    seq_len: int = 1024
    val_fraction: float = 0.05
    val_tokens: int = 65536  # validation tokens used for the report's perplexities
    #: text from a domain not used in training (a corpus, file or mix, as ``source``): the report adds
    #: its validation perplexity for every evaluated model; it must share no source with ``source``
    eval_ood_source: str | None = None


@dataclass
class StageConfig:
    """One training stage. ``steps=0`` skips it."""

    steps: int = 0
    lr: float = 1e-3
    batch_size: int = 8
    grad_accum: int = 1
    weight_decay: float = 0.0
    warmup_steps: int = 0
    scheduler: str = "constant"  # constant | cosine
    max_grad_norm: float = 1.0


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    keep_adapters: bool = False  # export the adapters next to the merged model
    #: which decoder layers get adapters: "all", "linearized" (only the converted layers: the kept softmax ones
    #: stay exactly the base's), or a list of layer indices
    layers: str | list[int] = "all"

    def __post_init__(self) -> None:
        ok = self.layers in ("all", "linearized") or (
            isinstance(self.layers, list) and self.layers and all(isinstance(i, int) and i >= 0 for i in self.layers))
        if not ok:
            raise ValueError(f"invalid lora.layers={self.layers!r}: give all, linearized or a list of layer indices")


@dataclass
class Stage2LossConfig:
    """Stage 2's objective, ``ce_weight * CE + kl_weight * KL``. CE is next-token cross-entropy on the training
    text (LoLCATs). KL is KL(teacher || student) of the next-token distributions at every position, at
    ``temperature`` (scaled by its square, as in Hinton et al.): distillation from the unconverted base, the
    same weights with every linearized layer run as softmax and the adapters off. CE alone adapts the model
    to the training text, which can cost accuracy elsewhere (the softmax controls lose LAMBADA); KL alone
    pulls it back toward the base it replaces, at the cost of one more forward pass a step."""

    ce_weight: float = 1.0
    kl_weight: float = 0.0
    temperature: float = 1.0

    def validate(self) -> None:
        """Made once all settings are applied (``RunConfig.check``), so ``--set`` items may come in any order."""
        if self.ce_weight < 0 or self.kl_weight < 0 or self.ce_weight + self.kl_weight <= 0:
            raise ValueError(f"invalid stage2_loss weights ce={self.ce_weight}, kl={self.kl_weight}: both >= 0, not both 0")
        if self.temperature <= 0:
            raise ValueError(f"invalid stage2_loss.temperature={self.temperature}: must be > 0")


@dataclass
class RunConfig:
    model: str = "smollm2-135m"
    #: False = the softmax control: no conversion and no attention transfer, only the same stage-2 LoRA
    #: on the same data, so that what domain adaptation alone gives is not credited to the conversion
    convert: bool = True
    linearize: LinearizeConfig = field(default_factory=LinearizeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # LoLCATs defaults: attention transfer with AdamW at lr 1e-2, LoRA finetuning at lr 1e-4
    stage1: StageConfig = field(default_factory=lambda: StageConfig(steps=200, lr=1e-2, batch_size=8))
    stage2: StageConfig = field(default_factory=lambda: StageConfig(steps=200, lr=1e-4, batch_size=8))
    lora: LoraConfig = field(default_factory=LoraConfig)
    stage2_loss: Stage2LossConfig = field(default_factory=Stage2LossConfig)
    #: block-wise attention transfer: [a, b] trains only layers a..b-1, from block inputs streamed
    #: through the frozen softmax layers before a (layers after b are not run); None = all layers
    transfer_block: list[int] | None = None
    #: start from another run's trained feature maps instead of training stage 1: that run's directory (or its
    #: stage1_final.safetensors); a relative path not found from here is looked up beside this run's --out, so
    #: queued runs can name a sibling run. Needs stage1.steps=0; its linearize settings must give the same maps
    stage1_from: str | None = None
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    #: several processes: "sharded" = no device holds the whole model (stage 1 a pipeline of blocks, stage 2,
    #: evaluations and samples on FSDP2 shards, export merged on rank 0's CPU); "replicate" = every rank holds
    #: the whole model (stage 2 DDP); "auto" = replicate when the weights take <= 10% of each device's memory,
    #: else sharded (placement.AUTO_REPLICATE_SHARE; one process always holds the whole model)
    placement: str = "auto"
    #: run the decoder layers through torch.compile while the stages train (inductor fuses the glue around the
    #: kernels; compiles take tens of seconds at the start of each stage); any placement
    compile: bool = False
    checkpoint_every: int = 25  # optimizer steps between checkpoints
    samples: list[str] = field(
        default_factory=lambda: [
            "Write a short poem about the sea.",
            "Explain what a linked list is in two sentences.",
            "It is a truth universally acknowledged, that",
        ]
    )
    sample_tokens: int = 48
    logger: str | None = None  # None | wandb | tensorboard (used only when installed)

    def __post_init__(self) -> None:
        for name in ("stage1", "stage2"):
            st = getattr(self, name)
            if st.steps < 0 or st.batch_size < 1 or st.grad_accum < 1 or st.lr <= 0:
                raise ValueError(f"invalid {name}: steps >= 0, batch_size >= 1, grad_accum >= 1 and lr > 0 are required")
            if st.scheduler not in ("constant", "cosine"):
                raise ValueError(f"invalid {name}.scheduler={st.scheduler!r}: choose constant or cosine")
        if self.data.seq_len < 2:
            raise ValueError(f"invalid data.seq_len={self.data.seq_len}: must be >= 2")
        if not 0 < self.data.val_fraction < 1:
            raise ValueError(f"invalid data.val_fraction={self.data.val_fraction}: must be in (0, 1)")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"invalid device={self.device!r}: choose auto, cpu or cuda")
        if self.transfer_block is not None and (
            len(self.transfer_block) != 2 or not 0 <= self.transfer_block[0] < self.transfer_block[1]
        ):
            raise ValueError(f"invalid transfer_block={self.transfer_block!r}: give [first, end) with 0 <= first < end")
        if self.placement not in ("auto", "replicate", "sharded"):
            raise ValueError(f"invalid placement={self.placement!r}: choose auto, replicate or sharded")
        if self.checkpoint_every < 1:
            raise ValueError("invalid checkpoint_every: must be >= 1")
        if not isinstance(self.convert, bool):
            raise ValueError(f"invalid convert={self.convert!r}: must be true or false")

    def check(self) -> None:
        """Checks across sections, made once every layer of settings is applied (so that the order of
        ``--set`` items does not matter); one-line ``ValueError``."""
        if not self.convert:
            if self.stage1.steps > 0 or self.transfer_block is not None:
                raise ValueError("convert=false (the softmax control) has no attention transfer: set stage1.steps=0 and no transfer_block")
            if self.stage2.steps == 0:
                raise ValueError("convert=false (the softmax control) trains only stage 2: set stage2.steps > 0")
            if self.lora.layers == "linearized":
                raise ValueError("convert=false (the softmax control) has no linearized layers: set lora.layers to all or a list")
            if self.stage2_loss.ce_weight == 0:
                raise ValueError("convert=false with stage2_loss.ce_weight=0 distills the base into itself (the KL starts and stays at 0): give ce_weight > 0")
        self.stage2_loss.validate()
        if self.stage1_from is not None:
            if not self.convert:
                raise ValueError("stage1_from needs convert=true: the softmax control has no feature maps")
            if self.stage1.steps > 0 or self.transfer_block is not None:
                raise ValueError(f"stage1_from={self.stage1_from!r} takes that run's trained maps as they are: set stage1.steps=0 and no transfer_block")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    # Fits a 2-core CPU in minutes: short sequences, a few hundred thousand tokens in all.
    "cpu-demo": {
        "linearize": {"window": 32, "feature_dim": 32},
        "data": {"source": "austen", "seq_len": 256, "val_tokens": 8192},
        "stage1": {"steps": 60, "lr": 1e-2, "batch_size": 4},
        "stage2": {"steps": 40, "lr": 1e-4, "batch_size": 4},
        "checkpoint_every": 10,
        "sample_tokens": 32,
    },
    # LoLCATs' recipe at 1024 tokens: ~20M tokens in all on a GPU.
    "full": {
        "linearize": {"window": 64, "feature_dim": 64},
        "data": {"source": "austen+shakespeare+pydocs+sharegpt", "seq_len": 1024, "val_tokens": 262144},
        "stage1": {"steps": 1200, "lr": 1e-2, "batch_size": 8},
        "stage2": {"steps": 1200, "lr": 1e-4, "batch_size": 8},
        "checkpoint_every": 100,
    },
}


def _merge(target: Any, values: dict[str, Any], path: str) -> Any:
    """Return a copy of dataclass ``target`` with ``values`` (nested dicts) applied; unknown keys fail."""
    known = {f.name: f for f in dataclasses.fields(target)}
    changes = {}
    for key, value in values.items():
        where = f"{path}{key}"
        if key not in known:
            raise ValueError(f"unknown config key {where!r}; known keys under {path or 'the top level'}: {sorted(known)}")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"config key {where!r} is a section; give it a mapping, not {value!r}")
            changes[key] = _merge(current, value, f"{where}.")
        else:
            changes[key] = value
    return dataclasses.replace(target, **changes)


def parse_override(item: str) -> dict[str, Any]:
    """``"stage1.lr=1e-3"`` -> ``{"stage1": {"lr": 0.001}}`` (values parsed as YAML scalars)."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like key=value (e.g. stage1.lr=1e-3)")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    if isinstance(value, str):  # YAML reads 1e-3 as a string; numbers like that are common here
        try:
            value = float(value)
        except ValueError:
            pass
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def build_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    **top_level: Any,
) -> RunConfig:
    """Defaults <- preset <- YAML file <- ``--set`` overrides <- explicit arguments."""
    cfg = RunConfig()
    layers: list[tuple[dict[str, Any], str]] = []
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        layers.append((PRESETS[preset], f"preset {preset}"))
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping of settings")
        layers.append((loaded, str(path)))
    for item in overrides or []:
        layers.append((parse_override(item), f"--set {item}"))
    layers.append(({k: v for k, v in top_level.items() if v is not None}, "arguments"))
    for values, origin in layers:
        try:
            cfg = _merge(cfg, values, "")
        except (ValueError, TypeError) as e:
            raise ValueError(f"{origin}: {e}") from None
    cfg.check()
    return cfg


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    return _merge(RunConfig(), data, "")
