"""The DeepSpeed JSON, resolved against the recipe: its ``"auto"`` fields (batch sizes, lr, betas, weight decay,
bf16) are filled from the recipe, and a concrete value that disagrees with the recipe is an error naming both."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from brainlm.exceptions import ConfigError
from brainlm.training.recipe import PretrainConfig, global_batch, lr_of

# DeepSpeed's top-level config sections (0.19): anything else is a typo DeepSpeed would ignore without a word.
KNOWN_KEYS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "optimizer", "scheduler", "fp16", "bf16", "amp", "zero_optimization", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "steps_per_print", "wall_clock_breakdown", "memory_breakdown", "dump_state",
    "prescale_gradients", "gradient_predivide_factor", "sparse_gradients", "communication_data_type",
    "seq_parallel_communication_data_type", "data_types", "activation_checkpointing", "flops_profiler",
    "comms_logger", "tensorboard", "wandb", "csv_monitor", "comet", "checkpoint", "aio", "elasticity", "autotuning",
    "compression_training", "data_efficiency", "curriculum_learning", "progressive_layer_drop", "eigenvalue",
    "quantize_training", "sparse_attention", "pipeline", "nebula", "compile", "torch_autocast", "disable_allgather",
    "fp32_allreduce", "dataloader_drop_last", "timers", "weight_quantization", "hybrid_engine",
    "use_data_before_expert_parallelism", "graph_harvesting", "tensor_parallel", "zenflow", "mics_shard_size",
}  # fmt: skip
OPTIMIZERS = ("AdamW", "Adam")  # what the recipe's optim.* (betas, weight decay) describe


def check_keys(ds: dict[str, Any], source: str) -> None:
    """Unknown top-level keys (a misspelling DeepSpeed would ignore) and optimizers the recipe cannot drive."""
    import difflib

    unknown = sorted(k for k in ds if k not in KNOWN_KEYS and not k.startswith("_"))
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, sorted(KNOWN_KEYS), n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(
            f"{source}: unknown DeepSpeed key(s) {', '.join(hints)}; DeepSpeed would ignore them silently. Fix the "
            "spelling, or prefix a note's key with _ "
        )
    kind = (ds.get("optimizer") or {}).get("type", "AdamW")
    if kind not in OPTIMIZERS:
        raise ConfigError(
            f"{source}: optimizer.type {kind!r}: the recipe's optimizer settings (optim.base_lr, betas, weight decay) "
            f"describe AdamW; use {' or '.join(OPTIMIZERS)}"
        )


def read_ds_config(ds_config: dict[str, Any] | str | Path) -> dict[str, Any]:
    """The DeepSpeed JSON as a dict (a dict is checked and passed through)."""
    if isinstance(ds_config, dict):
        check_keys(ds_config, "the DeepSpeed config")
        return ds_config
    path = Path(ds_config)
    if not path.exists():
        raise ConfigError(f"--deepspeed {path}: no such file; the default lives at the repository root")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"--deepspeed {path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}"
        ) from None
    if not isinstance(ds, dict):
        raise ConfigError(f"--deepspeed {path}: expected a JSON object, got {type(ds).__name__}")
    check_keys(ds, f"--deepspeed {path}")
    return ds


def resolve_ds_config(ds: dict[str, Any], cfg: PretrainConfig, world_size: int, bf16_available: bool) -> dict[str, Any]:
    """Fill the ``"auto"`` fields of a DeepSpeed config from the recipe; a concrete value that disagrees
    with the recipe is an error naming both."""
    ds = json.loads(json.dumps(ds))  # a deep copy
    if "scheduler" in ds:
        raise ConfigError(
            "ds_config.json has a 'scheduler' section; the warmup + cosine schedule comes from the recipe "
            "(optim.warmup_fraction, optim.min_lr_ratio): remove the section"
        )
    wanted = {
        ("train_micro_batch_size_per_gpu",): (cfg.train.micro_batch_size, "train.micro_batch_size"),
        ("gradient_accumulation_steps",): (cfg.train.grad_accum, "train.grad_accum"),
        ("train_batch_size",): (global_batch(cfg, world_size), "train.micro_batch_size x train.grad_accum x ranks"),
        ("gradient_clipping",): (cfg.optim.grad_clip, "optim.grad_clip"),
        ("optimizer", "params", "lr"): (lr_of(cfg, world_size), "optim.lr (base_lr x global batch / 256)"),
        ("optimizer", "params", "weight_decay"): (cfg.optim.weight_decay, "optim.weight_decay"),
        ("optimizer", "params", "betas"): ([cfg.optim.beta1, cfg.optim.beta2], "optim.beta1, optim.beta2"),
        ("bf16", "enabled"): (bf16_available, "bf16 where the accelerator supports it"),
    }
    for path, (value, source) in wanted.items():
        node = ds
        for key in path[:-1]:
            node = node.setdefault(key, {})
        current = node.get(path[-1], "auto")
        if current == "auto":
            node[path[-1]] = value
        elif current != value and not (
            isinstance(value, float)
            and isinstance(current, (int, float))
            and math.isclose(current, value, rel_tol=1e-9)
        ):
            raise ConfigError(
                f"ds_config.json sets {'.'.join(path)} = {current!r} but the recipe gives {value!r} "
                f'({source}); set it to "auto" in ds_config.json or change the recipe'
            )
    for key, value in ds.items():
        if value == "auto":
            raise ConfigError(f'ds_config.json field {key!r} is "auto" but the recipe has no value for it')
    return ds
