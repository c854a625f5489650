"""Fine-tuning sweeps: ASHA over FinetuneConfig knobs, every trial running ``train_one``."""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from pathlib import Path
from typing import Any

from ray import tune

from brainlm.eval.common import load_context
from brainlm.eval.finetune import FinetuneConfig, FinetuneData, load_data, save_finetuned, train_one
from brainlm.exceptions import NonFiniteLossError
from brainlm.tracking.env import git_sha
from brainlm.tuning.options import SweepOptions
from brainlm.tuning.session import in_trial, trial_device
from brainlm.tuning.space import FINETUNE_FIXED, apply_config, check_flags_vs_space, load_space
from brainlm.tuning.template import (
    asha,
    config_spec,
    default_name,
    finish_ranked,
    number,
    register_best,
    run_sweep,
    slug,
    trial_table,
)
from brainlm.tuning.trials import Headline, fmt_config

# -- fine-tuning sweeps -------------------------------------------------------------------------------------


def finetune_trial(config: dict[str, Any], data: FinetuneData, threads: int, device: str = "cpu") -> None:
    """One trial: ``train_one`` with the trial's FinetuneConfig on ``device`` (the GPU Ray gave it, or the CPU);
    reports after every epoch (for ASHA), then once more with the model at its best epoch as the checkpoint."""
    in_trial(threads)
    cfg = apply_config(data.cfg, config)
    data.ctx.to(device)
    data = dataclasses.replace(data, cfg=cfg)

    def report(epoch: int, metrics: dict[str, float]) -> None:
        if not math.isfinite(metrics["val_loss"]):
            raise NonFiniteLossError(
                f"epoch {epoch}: the validation loss is {metrics['val_loss']}; these settings diverge "
                f"({fmt_config(config)}): lower lr or narrow the search space"
            )
        tune.report(dict(metrics))

    model, test, history, _ = train_one(data, 0, report)
    best = min(history, key=lambda h: h["val_loss"])
    with tempfile.TemporaryDirectory() as tmp:
        save_finetuned(model, data, Path(tmp) / "model")
        (Path(tmp) / "trial.json").write_text(
            json.dumps({"config": dataclasses.asdict(cfg), "history": history, "test": test}, indent=1)
        )
        tune.report(
            {
                "val_loss": best["val_loss"],
                "best_epoch": best["epoch"],
                **{f"test_{k}": v for k, v in test.items()},
                "finished": 1,
            },
            checkpoint=tune.Checkpoint.from_directory(tmp),
        )


def finetune_sweep(
    model: str,
    shards: str,
    base: FinetuneConfig,
    space_path: str | Path,
    opts: SweepOptions,
    register_as: str | None = None,
    alias: str = "champion",
) -> dict[str, Any]:
    """ASHA over the knobs of ``space_path``; logs to MLflow; registers the best trial's model."""
    from brainlm.tracking.registry import lineage

    base = dataclasses.replace(base, seeds=1)
    space = load_space(space_path, FinetuneConfig, base, FINETUNE_FIXED)
    check_flags_vs_space(space, base, space_path)
    classification = base.task == "classification"
    keys = ["accuracy", "auc"] if classification else ["mse", "r2", "pearson_r"]
    register_as = register_as or f"brainlm-finetuned-{slug(base.target)}"
    opts.name = opts.name or default_name(f"finetune-{slug(base.target)}")
    pre = lineage(model)  # fails early on a missing registry entry
    ctx = load_context(model, shards, "cpu")  # trials move it to their own device
    data = load_data(ctx, base)  # once, on the driver: errors surface before Ray starts; trials share it
    if (ctx.model.extra or {}).get("manifest_sha256"):  # the data the backbone was pretrained on
        pre["pretrained_manifest_sha256"] = ctx.model.extra["manifest_sha256"]
    manifest_sha = ctx.manifest.plan_sha256
    spec = config_spec(
        "finetune",
        model,
        shards,
        base,
        space,
        opts,
        trial=finetune_trial,
        trial_args={"data": data, "threads": int(max(1, opts.cpus_per_trial)), "device": trial_device(opts)},
        headline=Headline("val_loss", "min", "epoch", (f"test_{keys[0]}", "best_epoch")),
        intro=f"finetune sweep {opts.name}: {base.target} ({base.task}, {base.transform}), {opts.samples} sample(s) "
        f"of {space_path}, up to {base.epochs} epochs per trial, ASHA on val_loss "
        f"({'-accuracy' if classification else 'MSE in the transformed space'}); "
        f"{sum(len(d.windows_NRW) for d in data.splits.values())} windows shared by every trial",
        parent_params={"cpus_per_trial": opts.cpus_per_trial, "gpus_per_trial": opts.gpus_per_trial},
        parent_tags={"target": base.target, "manifest_sha256": manifest_sha, **pre},
        scheduler=asha("epoch", base.epochs, 1, opts),
    )
    outcome = run_sweep(spec, opts)
    best = outcome.best
    registered, notes = None, []
    if best is not None:
        tags = {
            **pre,
            "manifest_sha256": manifest_sha,
            "target": base.target,
            "task": base.task,
            "transform": base.transform,
            "sweep": opts.name,
            "sweep_run_id": outcome.parent,
            "trial_id": best.trial_id,
            "val_loss": best.metrics["val_loss"],
            "git_sha": git_sha(),
            **{f"test_{k}": best.metrics.get(f"test_{k}") for k in keys},
        }
        registered = register_best(outcome, register_as, alias, tags)
        was = f", was version {registered['previous']}" if registered["previous"] else ""
        notes.append(
            f"best trial {best.trial_id}: registered {registered['uri']} (version {registered['version']}{was})"
        )
    metric_cols = ["epoch", "val_loss", *(f"test_{k}" for k in keys)]
    table_rows = trial_table(outcome.rows, list(space), metric_cols)
    for row, r in zip(table_rows, outcome.rows, strict=True):
        # a stopped trial's last report is its last epoch; its best epoch is in its history
        seen = [h["val_loss"] for h in r.history if number(h.get("val_loss")) and "epoch" in h]
        if r.outcome == "finished":
            row["epoch"] = max((h["epoch"] for h in r.history if number(h.get("epoch"))), default="")
        if seen and r.outcome == "stopped":
            row["val_loss"] = min(seen)
    summary = {"target": base.target, "registered": registered, "lineage": pre, "manifest_sha256": manifest_sha}
    return finish_ranked(
        outcome,
        opts,
        base.target,
        table_rows,
        metric_cols,
        summary,
        notes,
        parent_tags={"registered_model": register_as, "registered_version": registered["version"]}
        if registered
        else {},
    )
