"""Fine-tuning sweeps: ASHA over FinetuneConfig knobs, every trial running ``train_one``."""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import torch
from ray import tune

from brainlm.eval.common import load_context, table
from brainlm.eval.finetune import FinetuneConfig, FinetuneData, load_data, save_finetuned, train_one
from brainlm.exceptions import BrainLMError, NonFiniteLossError
from brainlm.tuning.session import (
    Headline,
    SweepOptions,
    _asha,
    _best,
    _counts,
    _default_name,
    _error_notes,
    _finish_parent,
    _fit,
    _fmt_config,
    _git_sha,
    _number,
    _out_dir,
    _rows,
    _show,
    _slug,
    _storage,
    _trial_table,
    _trials_figure,
    _write_summary,
    ray_session,
)
from brainlm.tuning.space import FINETUNE_FIXED, apply_config, check_flags_vs_space, load_space

# -- fine-tuning sweeps -------------------------------------------------------------------------------------


def finetune_trial(config: dict[str, Any], data: FinetuneData, threads: int) -> None:
    """One trial: ``train_one`` with the trial's FinetuneConfig; reports after every epoch (for ASHA), then
    once more with the model at its best epoch as the checkpoint."""
    torch.set_num_threads(max(1, threads))
    cfg = apply_config(data.cfg, config)
    data = dataclasses.replace(data, cfg=cfg)

    def report(epoch: int, metrics: dict[str, float]) -> None:
        if not math.isfinite(metrics["val_loss"]):
            raise NonFiniteLossError(
                f"epoch {epoch}: the validation loss is {metrics['val_loss']}; these settings diverge "
                f"({_fmt_config(config)}): lower lr or narrow the search space"
            )
        tune.report(dict(metrics))

    model, test, history = train_one(data, 0, report)
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
    from brainlm.tracking.env import tracking_store
    from brainlm.tracking.registry import lineage
    from brainlm.tracking.sweeps import SweepRuns

    base = dataclasses.replace(base, seeds=1)
    space = load_space(space_path, FinetuneConfig, base, FINETUNE_FIXED)
    check_flags_vs_space(space, base, space_path)
    classification = base.task == "classification"
    keys = ["accuracy", "auc"] if classification else ["mse", "r2", "pearson_r"]
    register_as = register_as or f"brainlm-finetuned-{_slug(base.target)}"
    opts.name = opts.name or _default_name(f"finetune-{_slug(base.target)}")
    pre = lineage(model)  # fails early on a missing registry entry
    ctx = load_context(model, shards)
    data = load_data(ctx, base)  # once, on the driver: errors surface before Ray starts; trials share it
    if (ctx.model.extra or {}).get("manifest_sha256"):  # the data the backbone was pretrained on
        pre["pretrained_manifest_sha256"] = ctx.model.extra["manifest_sha256"]
    manifest_sha = ctx.manifest.plan_sha256
    headline = Headline("val_loss", "min", "epoch", (f"test_{keys[0]}", "best_epoch"))
    runs = SweepRuns(opts.experiment)
    print(f"MLflow store: {tracking_store()}; experiment {opts.experiment}", flush=True)
    print(
        f"finetune sweep {opts.name}: {base.target} ({base.task}, {base.transform}), {opts.samples} sample(s) "
        f"of {space_path}, up to {base.epochs} epochs per trial, ASHA on val_loss "
        f"({'-accuracy' if classification else 'MSE in the transformed space'}); "
        f"{sum(len(d.windows_NRW) for d in data.splits.values())} windows shared by every trial",
        flush=True,
    )
    with ray_session(opts):
        parent = runs.open_parent(
            opts.name,
            f"{_storage(opts)}/{opts.name}",
            {
                "kind": "finetune",
                "model": model,
                "shards": str(shards),
                "fixed": dataclasses.asdict(base),
                "space": {k: str(d) for k, d in space.items()},
                "samples": opts.samples,
                "cpus_per_trial": opts.cpus_per_trial,
                "gpus_per_trial": opts.gpus_per_trial,
            },
            {
                "brainlm.kind": "finetune",
                "target": base.target,
                "manifest_sha256": manifest_sha,
                "git_sha": _git_sha(),
                **pre,
            },
            opts.resume,
        )
        trainable = tune.with_resources(
            tune.with_parameters(finetune_trial, data=data, threads=int(max(1, opts.cpus_per_trial))),
            {"cpu": opts.cpus_per_trial, "gpu": opts.gpus_per_trial},
        )
        results = _fit(
            trainable,
            {k: d.to_tune() for k, d in space.items()},
            headline,
            _asha("epoch", base.epochs, 1, opts),
            opts,
            runs,
            {"model": model, "shards": str(shards), **dataclasses.asdict(base)},
        )
    rows = _rows(results)
    best = _best(rows, "val_loss", "min")
    registered = None
    if best is not None:
        child = runs.child(best.trial_id, best.config)
        tags = {
            **pre,
            "manifest_sha256": manifest_sha,
            "target": base.target,
            "task": base.task,
            "transform": base.transform,
            "sweep": opts.name,
            "sweep_run_id": parent,
            "trial_id": best.trial_id,
            "val_loss": best.metrics["val_loss"],
            "git_sha": _git_sha(),
            **{f"test_{k}": best.metrics.get(f"test_{k}") for k in keys},
        }
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(best.checkpoint.to_directory(tmp)) / "model"
            try:
                version, before = runs.register(child, folder, register_as, alias, tags)
            except BrainLMError:
                raise
            except Exception as err:
                raise BrainLMError(
                    f"the sweep finished but registering its best model (trial {best.trial_id}) in "
                    f"{runs.uri} failed ({type(err).__name__}: {err}); the model is in {best.checkpoint.path}/model"
                ) from err
        registered = {
            "name": register_as,
            "version": version,
            "alias": alias,
            "previous": before,
            "uri": f"models:/{register_as}@{alias}",
        }
    params = list(space)
    metric_cols = ["epoch", "val_loss", *(f"test_{k}" for k in keys)]
    table_rows = []
    for row, r in zip(_trial_table(rows, params, metric_cols), rows, strict=True):
        # a stopped trial's last report is its last epoch; its best epoch is in its history
        seen = [h["val_loss"] for h in r.history if _number(h.get("val_loss")) and "epoch" in h]
        if r.outcome == "finished":
            row["epoch"] = max((h["epoch"] for h in r.history if _number(h.get("epoch"))), default="")
        if seen and r.outcome == "stopped":
            row["val_loss"] = min(seen)
        row["best"] = "*" if best is not None and r.trial_id == best.trial_id else ""
        table_rows.append(row)
    counts = _counts(rows)
    title = (
        f"finetune sweep {opts.name}: {base.target}, {counts['trials']} trials ({counts['finished']} finished, "
        f"{counts['stopped']} stopped early by ASHA, {counts['error']} errored); val_loss: lower is better"
    )
    notes = _error_notes(rows)
    if registered:
        notes.insert(
            0,
            f"best trial {best.trial_id}: registered {registered['uri']} (version {registered['version']}"
            + (f", was version {registered['previous']}" if registered["previous"] else "")
            + ")",
        )
    columns = ["trial", "outcome", *params, *metric_cols, "best"]
    summary = {
        "name": opts.name,
        "kind": "finetune",
        "target": base.target,
        "counts": counts,
        "best_trial": best.trial_id if best else None,
        "best_config": best.config if best else None,
        "best_metrics": {k: best.metrics.get(k) for k in ["val_loss", *(f"test_{k}" for k in keys)]} if best else None,
        "registered": registered,
        "parent_run_id": parent,
        "lineage": pre,
        "manifest_sha256": manifest_sha,
    }
    out = _out_dir(opts)
    files = _write_summary(out, "summary", title, table_rows, columns, summary, notes)
    files.append(_trials_figure(rows, "epoch", "val_loss", out / "trials.png", title, best))
    best_metrics = {f"best_{k}": v for k, v in (summary["best_metrics"] or {}).items() if _number(v)}
    _finish_parent(
        runs,
        parent,
        rows,
        files,
        best_metrics,
        {
            "best_trial": summary["best_trial"] or "none",
            **({"registered_model": register_as, "registered_version": registered["version"]} if registered else {}),
        },
    )
    print("\n" + table(_show(table_rows), columns, title))
    for note in notes:
        print(note)
    print(f"summary: {files[0]} (and .tsv, .json); MLflow parent run {parent} in experiment {opts.experiment}")
    if best is None:
        raise BrainLMError(
            f"no trial of sweep {opts.name} finished ({counts['error']} errored, {counts['stopped']} "
            f"stopped); see the errors above and {out / 'summary.md'}"
        )
    return summary
