"""Recipes: typed dataclasses are the schema, YAML files the recipes, dotted flags the overrides.

    recipe = load_recipe("configs/pretrain/13m.yaml", ["--model.mask_ratio", "0.5", "--train.max_steps=100"])

Every field's docstring doubles as ``--help``. Unknown keys and ill-typed values are errors that name the
flag. The DeepSpeed JSON's ``"auto"`` fields are filled from the recipe (``training/ds_config.py``), so the two
files never disagree.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from brainlm.exceptions import ConfigError
from brainlm.model.config import PRESETS, ModelConfig, get_preset
from brainlm.schema import coerce, field_docs, unknown_key

SELECT = ("last", "best")  # train.select: which weights the export holds


@dataclass
class DataConfig:
    shards: str = "demo/shards"
    """Shard set to train on: a local folder or s3://bucket/prefix holding manifest.json; several, comma-separated
    (a YAML list in a recipe), train one model on all of them, one set per micro-batch (any atlases, one TR)."""
    weights: str = ""
    """Sampling weights of the shard sets, comma-separated, one per set; default: their training crops."""
    train_split: str = "train"
    """Split to train on."""
    val_split: str = "val"
    """Split for validation masked R^2 (fixed windows and masks): held-out subjects of their own, never test."""
    num_workers: int = 1
    """DataLoader worker processes per rank (0 = read in the training process)."""
    prefetch: int = 4
    """Micro-batches each worker prepares ahead."""
    on_corrupt: str = "error"
    """A shard sample that fails its checksum (or a shard short of its samples): error (stop, naming the shard) |
    skip (leave the sample out, warn and count)."""
    steps_per_epoch: int | None = None
    """Optimizer steps per epoch; default: the train split's crops / global batch (rounded up)."""


@dataclass
class OptimConfig:
    base_lr: float = 1e-3
    """Learning rate per 256 samples: lr = base_lr * global_batch / 256 (the paper's rule)."""
    lr: float | None = None
    """Absolute learning rate; overrides base_lr when set."""
    weight_decay: float = 0.05
    """AdamW weight decay (not applied to norms, biases, embeddings, CLS and mask tokens)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    warmup_fraction: float = 0.05
    """Share of max_steps spent in linear warmup (the paper: 5%)."""
    min_lr_ratio: float = 0.0
    """Cosine schedule's final lr as a share of the peak."""
    grad_clip: float = 1.0
    """Gradient-norm clipping (DeepSpeed gradient_clipping)."""


@dataclass
class TrainConfig:
    micro_batch_size: int = 8
    """Samples per rank per forward/backward."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    max_steps: int = 1000
    """Optimizer steps in the run."""
    seed: int = 0
    """Seed of the weights, the data order, the windows and the masks."""
    out_dir: str = "runs/pretrain"
    """Run folder: checkpoints, the exported model, logs."""
    log_every: int = 10
    """Log one line every this many steps (rank 0)."""
    val_every: int = 100
    """Validation masked R^2 every this many steps (and at the end); 0 = only at the end."""
    val_samples: int = 64
    """Fixed validation windows (rounded down to a multiple of the world size)."""
    ckpt_every: int = 100
    """Checkpoint every this many steps (and at the end); 0 = only at the end."""
    keep_last: int = 3
    """Checkpoints to keep."""
    resume: str | None = None
    """auto (the latest checkpoint in out_dir, if any) | a checkpoint folder | null (start fresh)."""
    init_from: str | None = None
    """Start from an exported model's weights (a folder, models:/NAME@ALIAS or runs:/...): continued pretraining, e.g.
    on your cohort from a model pretrained on others. The recipe's model must have the same architecture (any atlas:
    parcels are placed by their coordinates); the decoder prior is refitted on this shard set. A checkpoint to
    resume from (train.resume) takes precedence."""
    export: bool = True
    """Export model.safetensors + config.json + scaling.json to out_dir/model at the end."""
    select: str = "last"
    """The weights the export holds: last (the final step's) or best (those of the validation step with the highest
    val masked R^2: with several shard sets, the mean of their curves; kept in out_dir/best as training goes)."""
    dist_timeout_s: float = 600.0
    """Seconds a collective waits for the other ranks before the job fails (a rank that died or hangs)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass: less memory, about 1/3 more compute."""
    peak_tflops: float | None = None
    """Accelerator peak (TFLOP/s per rank) for MFU; default: known GPUs' bf16 dense peak, none on CPU."""


@dataclass
class TrackingConfig:
    enabled: bool = True
    """Log params, metrics and artifacts to MLflow and register the model."""
    tracking_uri: str | None = None
    """MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite:///<out_dir>/../mlflow.db."""
    experiment: str = "brainlm-pretrain"
    """MLflow experiment."""
    run_name: str | None = None
    """MLflow run name (default: the out_dir's name)."""
    register_as: str | None = None
    """Registered model name; null = do not register."""
    alias: str = "current"
    """Alias set on the registered version (MLflow reserves "latest")."""


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=lambda: get_preset("debug"))
    preset: str = "debug"
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = {"preset": d.pop("preset"), **d["model"]}
        return d


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "tracking": TrackingConfig,
    "model": ModelConfig,
}


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--a.b", "1", "--c.d=x"]`` -> ``{"a.b": 1, "c.d": "x"}`` (values parsed as YAML scalars)."""
    out, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=")[0]:
            raise ConfigError(
                f"unexpected argument {arg!r}: overrides look like --section.key VALUE or --section.key=VALUE"
            )
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"{arg} needs a value")
            key, raw = arg[2:], args[i + 1]
            i += 2
        try:
            out[key] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            out[key] = raw
    return out


def build_recipe(raw: dict[str, Any], overrides: dict[str, Any] | None = None) -> PretrainConfig:
    """A PretrainConfig from a nested dict (a YAML recipe) plus dotted overrides."""
    raw = {k: dict(v or {}) for k, v in (raw or {}).items()}
    for section in raw:
        if section not in SECTIONS:
            raise unknown_key(section, list(SECTIONS))
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        if section not in SECTIONS or not name or "." in name:
            raise unknown_key(key, [f"{s}.<field>" for s in SECTIONS])
        raw.setdefault(section, {})[name] = value

    model_raw = raw.pop("model", {})
    preset = str(model_raw.pop("preset", "debug"))
    if preset not in PRESETS:
        raise ConfigError(f"`model.preset` {preset!r} is not one of {', '.join(PRESETS)}")
    sections: dict[str, Any] = {}
    for name, cls in [*((s, c) for s, c in SECTIONS.items() if s != "model"), ("model", ModelConfig)]:
        values = model_raw if name == "model" else raw.get(name, {})
        hints = typing.get_type_hints(cls)
        valid = [f.name for f in dataclasses.fields(cls)]
        kwargs = {}
        for key, value in values.items():
            if key not in valid:
                listed = valid + (["preset"] if name == "model" else [])
                raise unknown_key(f"{name}.{key}", [f"{name}.{v}" for v in listed])
            if name == "data" and key in ("shards", "weights") and isinstance(value, list):
                value = ",".join(str(v) for v in value)  # a YAML list of shard sets (or weights)
            kwargs[key] = coerce(f"{name}.{key}", value, hints[key])
        sections[name] = get_preset(preset, **kwargs) if name == "model" else cls(**kwargs)
    cfg = PretrainConfig(preset=preset, **sections)
    validate(cfg)
    return cfg


def validate(cfg: PretrainConfig) -> None:
    t, o = cfg.train, cfg.optim
    for key, value in (
        ("train.micro_batch_size", t.micro_batch_size),
        ("train.grad_accum", t.grad_accum),
        ("train.max_steps", t.max_steps),
        ("train.log_every", t.log_every),
        ("train.keep_last", t.keep_last),
    ):
        if value < 1:
            raise ConfigError(f"`{key}` must be at least 1, got {value}")
    if cfg.data.on_corrupt not in ("error", "skip"):
        raise ConfigError(f"`data.on_corrupt` must be error or skip, got {cfg.data.on_corrupt!r}")
    if cfg.data.val_split == "test" or cfg.data.val_split == cfg.data.train_split:
        raise ConfigError(
            f"`data.val_split` {cfg.data.val_split!r}: validation must be subjects of its own (the learning curve "
            "and every choice made on it would be scored on the subjects the results report; docs/evaluation.md); "
            "use val, and build the shards with validation subjects (--val-frac or --splits)"
        )
    if t.select not in SELECT:
        raise ConfigError(f"`train.select` must be one of {', '.join(SELECT)}, got {t.select!r}")
    if t.dist_timeout_s <= 0:
        raise ConfigError(f"`train.dist_timeout_s` must be positive, got {t.dist_timeout_s}")
    if not 0 <= o.warmup_fraction < 1:
        raise ConfigError(f"`optim.warmup_fraction` must be in [0, 1), got {o.warmup_fraction}")
    if t.resume not in (None, "auto") and not Path(t.resume).exists():
        raise ConfigError(f"`train.resume` {t.resume!r}: expected auto, null or an existing checkpoint folder")


def load_recipe(path: str | Path | None, overrides: list[str] | dict[str, Any] | None = None) -> PretrainConfig:
    """Read a YAML recipe (or none: all defaults) and apply overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"recipe {path} does not exist; recipes live in configs/pretrain/")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            where = getattr(err, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
            raise ConfigError(
                f"recipe {path} is not valid YAML{at}: {getattr(err, 'problem', None) or err}; fix the file "
                "(configs/pretrain/debug.yaml is a working example)"
            ) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"recipe {path}: expected a mapping of sections, got {type(raw).__name__}")
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    return build_recipe(raw, overrides)


def help_text() -> str:
    """Every override with its default and docstring."""
    lines = []
    defaults = PretrainConfig()
    for section, cls in SECTIONS.items():
        docs = field_docs(cls)
        lines.append(f"{section}:")
        if section == "model":
            presets = ", ".join(PRESETS)
            lines.append(f"  --model.preset (default debug)  one of {presets}; other model.* fields override it")
        obj = getattr(defaults, section)
        for f in dataclasses.fields(cls):
            lines.append(f"  --{section}.{f.name} (default {getattr(obj, f.name)!r})  {docs.get(f.name, '')}")
    return "\n".join(lines)


def lr_of(cfg: PretrainConfig, world_size: int) -> float:
    """The peak learning rate: optim.lr, else base_lr x global batch / 256 (the paper's rule)."""
    return cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.base_lr * global_batch(cfg, world_size) / 256


def global_batch(cfg: PretrainConfig, world_size: int) -> int:
    return cfg.train.micro_batch_size * cfg.train.grad_accum * world_size


def warmup_steps(cfg: PretrainConfig) -> int:
    return max(1, math.ceil(cfg.optim.warmup_fraction * cfg.train.max_steps)) if cfg.optim.warmup_fraction else 0
