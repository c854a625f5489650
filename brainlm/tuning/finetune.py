"""Fine-tuning sweeps: ASHA over FinetuneConfig knobs, every trial running ``train_one`` on data loaded once on the
driver; the best trial's model is registered (``FINETUNE``, a ``ConfigSweep``)."""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from pathlib import Path
from typing import Any

from ray import tune

from brainlm.eval.common import Context
from brainlm.eval.finetune import FinetuneConfig, FinetuneData, load_data, save_finetuned, train_one
from brainlm.exceptions import NonFiniteLossError
from brainlm.tracking.env import git_sha
from brainlm.tuning.options import SweepOptions
from brainlm.tuning.ranked import ConfigSweep, Inputs, Report, run_config_sweep
from brainlm.tuning.session import in_trial
from brainlm.tuning.space import FINETUNE_FIXED, apply_config
from brainlm.tuning.template import SweepOutcome, register_best, slug
from brainlm.tuning.trials import fmt_config, number

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


def _metric_keys(base: FinetuneConfig) -> list[str]:
    return ["accuracy", "auc"] if base.task == "classification" else ["mse", "r2", "pearson_r"]


def _pretrained_on(ctx: Context) -> dict[str, str]:
    """The data the backbone was pretrained on, as a tag (when its export says)."""
    sha = (ctx.model.extra or {}).get("manifest_sha256")
    return {"pretrained_manifest_sha256": sha} if sha else {}


def finetune_inputs(ctx: Context, base: FinetuneConfig, space: dict, opts: SweepOptions, **_: Any) -> Inputs:
    """The labelled windows, loaded once and shared by every trial."""
    data = load_data(ctx, base)
    loss = "-accuracy" if base.task == "classification" else "MSE in the transformed space"
    return Inputs(
        trial_args={"data": data},
        subject=base.target,
        intro=f"{base.target} ({base.task}, {base.transform}), up to {base.epochs} epochs per trial, ASHA on "
        f"val_loss ({loss}); {sum(len(d.windows_NRW) for d in data.splits.values())} windows shared by every trial",
        max_t=base.epochs,
        metrics=["epoch", "val_loss", *(f"test_{k}" for k in _metric_keys(base))],
        show=(f"test_{_metric_keys(base)[0]}", "best_epoch"),
        params={"cpus_per_trial": opts.cpus_per_trial, "gpus_per_trial": opts.gpus_per_trial},
        tags={"target": base.target, **_pretrained_on(ctx)},
    )


def register_champion(
    outcome: SweepOutcome,
    table_rows: list[dict[str, Any]],
    ctx: Context,
    base: FinetuneConfig,
    opts: SweepOptions,
    lineage: dict[str, Any],
    register_as: str | None = None,
    alias: str = "champion",
) -> Report:
    """Register the best trial's model (tagged with the pretrained model's lineage, the data and the trial); a
    stopped trial's row shows its best epoch's validation loss, a finished one's its last epoch."""
    for row, r in zip(table_rows, outcome.rows, strict=True):
        seen = [h["val_loss"] for h in r.history if number(h.get("val_loss")) and "epoch" in h]
        if r.outcome == "finished":
            row["epoch"] = max((h["epoch"] for h in r.history if number(h.get("epoch"))), default="")
        if seen and r.outcome == "stopped":
            row["val_loss"] = min(seen)
    manifest_sha, lineage = ctx.manifest.plan_sha256, {**lineage, **_pretrained_on(ctx)}
    report = Report(
        summary={"target": base.target, "registered": None, "lineage": lineage, "manifest_sha256": manifest_sha}
    )
    best = outcome.best
    if best is None:
        return report
    name = register_as or f"brainlm-finetuned-{slug(base.target)}"
    tags = {
        **lineage,
        "manifest_sha256": manifest_sha,
        "target": base.target,
        "task": base.task,
        "transform": base.transform,
        "sweep": opts.name,
        "sweep_run_id": outcome.parent,
        "trial_id": best.trial_id,
        "val_loss": best.metrics["val_loss"],
        "git_sha": git_sha(),
        **{f"test_{k}": best.metrics.get(f"test_{k}") for k in _metric_keys(base)},
    }
    registered = register_best(outcome, name, alias, tags)
    was = f", was version {registered['previous']}" if registered["previous"] else ""
    report.summary["registered"] = registered
    report.notes.append(
        f"best trial {best.trial_id}: registered {registered['uri']} (version {registered['version']}{was})"
    )
    report.parent_tags = {"registered_model": name, "registered_version": registered["version"]}
    return report


FINETUNE = ConfigSweep(
    kind="finetune",
    config=FinetuneConfig,
    fixed=FINETUNE_FIXED,
    trial=finetune_trial,
    metric="val_loss",
    mode="min",
    step_key="epoch",
    grace=1,
    name="finetune-{target}",
    inputs=finetune_inputs,
    report=register_champion,
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
    """ASHA over the knobs of ``space_path`` (one seed per trial); logs to MLflow; registers the best trial's model
    as ``register_as`` (default brainlm-finetuned-TARGET) with ``alias``."""
    base = dataclasses.replace(base, seeds=1)
    return run_config_sweep(FINETUNE, model, shards, base, space_path, opts, register_as=register_as, alias=alias)
