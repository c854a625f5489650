"""The sweep template: one function runs any sweep kind (``run_sweep``: open the parent run, fit the trials with
their resources, collect the rows and the best trial); ``report.finish_sweep`` writes what it found. ``scale`` is a
``SweepSpec`` over it; ``finetune`` and ``perturb`` are ``ranked.ConfigSweep`` specs, a sweep over a config's
knobs."""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler

from brainlm.exceptions import BrainLMError, ConfigError, SweepInterrupted
from brainlm.tracking.env import git_sha
from brainlm.tuning.options import SweepOptions
from brainlm.tuning.session import ray_session, storage_filesystem, storage_path
from brainlm.tuning.trials import Headline, MLflowTrials, number, short_error

log = logging.getLogger(__name__)


def asha(time_attr: str, max_t: int, default_grace: int, opts: SweepOptions) -> ASHAScheduler:
    """ASHA on ``time_attr`` up to ``max_t``; the trials that reach it are not stopped, because a trial's last
    report (its model) comes after max_t."""
    return ASHAScheduler(
        time_attr=time_attr,
        max_t=max_t,
        grace_period=min(opts.grace_period or default_grace, max_t),
        reduction_factor=opts.reduction_factor,
        stop_last_trials=False,
    )


def fit(
    trainable,
    param_space: dict[str, Any],
    headline: Headline,
    scheduler,
    opts: SweepOptions,
    runs: Any,
    fixed: dict[str, Any],
    metric: bool = True,
) -> tune.ResultGrid:
    """Run (or with ``--resume`` continue) the experiment ``storage/name``; failed trials do not stop it."""
    storage = storage_path(opts)
    fs = storage_filesystem(storage)
    if fs is not None:  # with an explicit filesystem Ray takes paths inside it: bucket/prefix
        storage = storage.split("://", 1)[1]
    path = f"{storage.rstrip('/')}/{opts.name}"
    exists = tune.Tuner.can_restore(path, storage_filesystem=fs)
    if opts.resume:
        if not exists:
            raise ConfigError(
                f"--resume: no sweep {opts.name!r} under {storage} (no experiment state at {path}); "
                "check --storage and --name"
            )
        log.info(
            f"resuming {path}: unfinished trials go on"
            + ("; errored trials start again" if opts.retry_errored else "; errored trials stay errored")
        )
        tuner = tune.Tuner.restore(
            path,
            trainable,
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=opts.retry_errored,
            storage_filesystem=fs,
        )
    else:
        if exists:
            raise ConfigError(
                f"a sweep named {opts.name!r} already exists at {path}; pass --resume to continue it or another --name"
            )
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=headline.metric if metric else None,
                mode=headline.mode if metric else None,
                scheduler=scheduler,
                num_samples=opts.samples,
                trial_name_creator=lambda t: t.trial_id,
                trial_dirname_creator=lambda t: t.trial_id,
            ),
            run_config=tune.RunConfig(
                name=opts.name,
                storage_path=storage,
                storage_filesystem=fs,
                callbacks=[MLflowTrials(runs, headline, fixed)],
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                log_to_file=True,  # trials' own output goes to their folders, not over the progress lines
                verbose=0,  # MLflowTrials prints one line per trial event and a status line every 30 s
            ),
        )
    results = tuner.fit()
    # After Ctrl+C Tune saves the experiment's state and returns early. A trial ASHA stopped has done=True in its
    # last result and a finished one its final report; one that never started or was cut off has neither.
    unfinished = sum(
        1
        for r in results
        if not r.error and not (r.metrics or {}).get("finished") and not (r.metrics or {}).get("done")
    )
    if unfinished:
        with contextlib.suppress(Exception):
            runs.end(runs.parent_id, "KILLED")
        raise SweepInterrupted(
            f"sweep {opts.name} was interrupted with {unfinished} of {len(results)} trials unfinished; its state is "
            f"in {path}. Continue it with the same command and --resume --name {opts.name}"
        )
    return results


@dataclass
class TrialRow:
    trial_id: str
    outcome: str  # finished | stopped | error
    config: dict[str, Any]
    metrics: dict[str, Any]  # the last reported result
    history: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""
    checkpoint: Any = None


def rows_of(results: tune.ResultGrid) -> list[TrialRow]:
    rows = []
    for r in results:
        metrics = dict(r.metrics or {})
        history = r.metrics_dataframe.to_dict("records") if r.metrics_dataframe is not None else []
        outcome = "error" if r.error else "finished" if metrics.get("finished") else "stopped"
        rows.append(
            TrialRow(
                Path(r.path).name,
                outcome,
                dict(r.config or {}),
                metrics,
                history,
                short_error(r.error) if r.error else "",
                r.checkpoint,
            )
        )
    return sorted(rows, key=lambda t: t.trial_id)


def best_of(rows: list[TrialRow], metric: str, mode: str) -> TrialRow | None:
    done = [
        r
        for r in rows
        if r.outcome == "finished" and number(r.metrics.get(metric)) and math.isfinite(r.metrics[metric])
    ]
    if not done:
        return None
    return (min if mode == "min" else max)(done, key=lambda r: r.metrics[metric])


def count_outcomes(rows: list[TrialRow]) -> dict[str, int]:
    return {"trials": len(rows), **{k: sum(r.outcome == k for r in rows) for k in ("finished", "stopped", "error")}}


def default_name(prefix: str) -> str:
    return f"{prefix}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "x"


def out_dir(opts: SweepOptions) -> Path:
    out = Path(opts.out or Path("runs") / "sweeps" / opts.name)
    out.mkdir(parents=True, exist_ok=True)
    return out


@dataclass
class SweepSpec:
    """One sweep: what every trial runs, on what, how its outcome is judged, and what the parent run records."""

    kind: str  # finetune | perturb | scale
    trial: Callable[..., None]  # the Ray Tune function trainable
    trial_args: dict[str, Any]  # handed to every trial (tune.with_parameters: through Ray's object store)
    space: dict[str, Any]  # Ray Tune's param_space
    headline: Headline
    intro: str  # the line printed before the trials start
    parent_params: dict[str, Any]
    parent_tags: dict[str, Any]
    fixed: dict[str, Any]  # the settings every trial shares (logged with each child run)
    scheduler: Any = None  # ASHA, or None for a grid that runs every point to the end
    grid: bool = False  # every point once (num_samples 1), nothing to rank by


@dataclass
class SweepOutcome:
    spec: SweepSpec
    runs: Any  # brainlm.tracking.sweeps.SweepRuns
    parent: str
    rows: list[TrialRow]
    best: TrialRow | None

    @property
    def counts(self) -> dict[str, int]:
        return count_outcomes(self.rows)


def run_sweep(spec: SweepSpec, opts: SweepOptions) -> SweepOutcome:
    """Open the parent run, fit the trials (each with its resources), collect the rows and the best trial."""
    from brainlm.tracking.env import tracking_store
    from brainlm.tracking.sweeps import SweepRuns

    runs = SweepRuns(opts.experiment)
    log.info(f"MLflow store: {tracking_store()}; experiment {opts.experiment}")
    log.info(spec.intro)
    with ray_session(opts):
        parent = runs.open_parent(
            opts.name,
            f"{storage_path(opts)}/{opts.name}",
            {"kind": spec.kind, **spec.parent_params},
            {"brainlm.kind": spec.kind, "git_sha": git_sha(), **spec.parent_tags},
            opts.resume,
        )
        trainable = tune.with_resources(
            tune.with_parameters(spec.trial, **spec.trial_args),
            {"cpu": opts.cpus_per_trial, "gpu": opts.gpus_per_trial},
        )
        samples = opts.samples
        if spec.grid:
            opts.samples = 1  # a grid: every point once
        try:
            results = fit(
                trainable, spec.space, spec.headline, spec.scheduler, opts, runs, spec.fixed, metric=not spec.grid
            )
        finally:
            opts.samples = samples
    rows = rows_of(results)
    best = None if spec.grid else best_of(rows, spec.headline.metric, spec.headline.mode)
    return SweepOutcome(spec, runs, parent, rows, best)


def register_best(outcome: SweepOutcome, name: str, alias: str, tags: dict[str, Any]) -> dict[str, Any]:
    """Register the best trial's saved model (``model/`` in its checkpoint) under ``name`` and point ``alias`` at it."""
    import tempfile

    best = outcome.best
    child = outcome.runs.child(best.trial_id, best.config)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(best.checkpoint.to_directory(tmp)) / "model"
        try:
            version, before = outcome.runs.register(child, folder, name, alias, tags)
        except BrainLMError:
            raise
        except Exception as err:
            raise BrainLMError(
                f"the sweep finished but registering its best model (trial {best.trial_id}) in "
                f"{outcome.runs.uri} failed ({type(err).__name__}: {err}); the model is in {best.checkpoint.path}/model"
            ) from err
    return {"name": name, "version": version, "alias": alias, "previous": before, "uri": f"models:/{name}@{alias}"}
