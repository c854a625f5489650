"""Sweeps over a config's knobs, as data. A ``ConfigSweep`` says what varies (a config class, and the fields a space
may not touch), what every trial runs, how trials are ranked, what the kind loads once on the driver (``inputs``)
and what its report adds (``report``: a registered model, the best trial's files); ``run_config_sweep`` does the
rest for every kind: the space, the pretrained model's lineage, the shared context, the parent run, the trials, the
ranked report. ``finetune.FINETUNE`` and ``perturb.PERTURB`` are the two kinds."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brainlm.eval.common import load_context
from brainlm.tuning.options import SweepOptions
from brainlm.tuning.report import error_notes, finish_sweep, trial_table, trials_figure
from brainlm.tuning.session import trial_device
from brainlm.tuning.space import check_flags_vs_space, load_space
from brainlm.tuning.template import (
    SweepOutcome,
    SweepSpec,
    asha,
    default_name,
    out_dir,
    run_sweep,
    slug,
)
from brainlm.tuning.trials import Headline, number


@dataclass
class Inputs:
    """What a kind loads once on the driver for its trials (errors surface before Ray starts), and how the sweep is
    described."""

    trial_args: dict[str, Any]  # handed to every trial (through Ray's object store), besides threads and device
    subject: str  # what the sweep is about, in its title: the target, source -> target
    intro: str  # printed before the trials start, after "<kind> sweep <name>: "
    max_t: int  # ASHA's budget per trial, in the headline's step units
    metrics: list[str]  # the report's metric columns, the step first
    show: tuple[str, ...] = ()  # further final metrics printed with each finished trial
    params: dict[str, Any] = field(default_factory=dict)  # the parent run's params, besides the shared ones
    tags: dict[str, Any] = field(default_factory=dict)  # the parent run's tags, besides the lineage


@dataclass
class Report:
    """What a kind's report adds to the ranked one."""

    summary: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    parent_tags: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ConfigSweep:
    """One kind of sweep over the knobs of ``config``, declared."""

    kind: str
    config: type  # the dataclass whose fields a search space varies
    fixed: dict[str, str]  # fields a space may not vary, and why
    trial: Callable[..., None]  # the Ray Tune function trainable: trial(config, **inputs.trial_args, threads, device)
    metric: str  # what ranks the trials (and ASHA stops on)
    mode: str  # min | max
    step_key: str  # the reported field that counts progress: ASHA's time axis and the figure's x
    grace: int  # ASHA's grace period unless --grace-period says otherwise
    name: str  # the default sweep name before its timestamp, formatted with the base config's fields
    # (ctx, base, space, opts, **kind_args) -> Inputs
    inputs: Callable[..., Inputs]
    # (outcome, table_rows, ctx, base, opts, lineage, **kind_args) -> Report, lineage the pretrained model's
    # (tracking.registry.lineage); may correct table_rows in place
    report: Callable[..., Report]


def run_config_sweep(
    sweep: ConfigSweep, model: str, shards: str, base: Any, space_path: str | Path, opts: SweepOptions, **kind_args: Any
) -> dict[str, Any]:
    """ASHA over the knobs of ``space_path`` (``base`` sets the rest), each trial on ``model``'s context over
    ``shards``; logs to MLflow (the model's lineage and the shard set's plan in the parent run); writes the ranked
    report with what ``sweep.report`` adds; raises when no trial finished."""
    from brainlm.tracking.registry import lineage

    space = load_space(space_path, sweep.config, base, sweep.fixed)
    check_flags_vs_space(space, base, space_path)
    fields = {k: slug(str(v)) for k, v in dataclasses.asdict(base).items()}
    opts.name = opts.name or default_name(sweep.name.format(**fields))
    pre = lineage(model)  # fails early on a missing registry entry
    ctx = load_context(model, shards, "cpu")  # trials move it to their own device
    inputs = sweep.inputs(ctx, base, space, opts, **kind_args)
    shared, settings = {"model": model, "shards": str(shards)}, dataclasses.asdict(base)
    spec = SweepSpec(
        kind=sweep.kind,
        trial=sweep.trial,
        trial_args={**inputs.trial_args, "threads": int(max(1, opts.cpus_per_trial)), "device": trial_device(opts)},
        space={k: d.to_tune() for k, d in space.items()},
        headline=Headline(sweep.metric, sweep.mode, sweep.step_key, inputs.show),
        intro=f"{sweep.kind} sweep {opts.name}: {inputs.intro}; {opts.samples} sample(s) of {space_path}",
        parent_params=shared
        | {"fixed": settings, "space": {k: str(d) for k, d in space.items()}, "samples": opts.samples}
        | inputs.params,
        parent_tags={"manifest_sha256": ctx.manifest.plan_sha256, **pre, **inputs.tags},
        fixed=shared | settings,
        scheduler=asha(sweep.step_key, inputs.max_t, sweep.grace, opts),
    )
    outcome = run_sweep(spec, opts)
    table_rows = trial_table(outcome.rows, list(space), inputs.metrics)
    extra = sweep.report(outcome, table_rows, ctx, base, opts, pre, **kind_args)
    return finish_ranked(outcome, opts, inputs.subject, table_rows, inputs.metrics, extra)


def finish_ranked(
    outcome: SweepOutcome,
    opts: SweepOptions,
    subject: str,
    table_rows: list[dict[str, Any]],
    metric_cols: list[str],
    extra: Report,
) -> dict[str, Any]:
    """Report a ranked sweep: the best trial marked in the table, the trials figure (the headline metric against its
    time axis), the summary (``extra.summary`` on top of the counts and the best trial's config and metrics), the
    best metrics in the parent run; raises when no trial finished (after the report is written)."""
    spec, rows, best, counts = outcome.spec, outcome.rows, outcome.best, outcome.counts
    metric, better = spec.headline.metric, "lower" if spec.headline.mode == "min" else "higher"
    for row in table_rows:
        row["best"] = "*" if best is not None and row["trial"] == best.trial_id else ""
    title = (
        f"{spec.kind} sweep {opts.name}: {subject}, {counts['trials']} trials ({counts['finished']} finished, "
        f"{counts['stopped']} stopped early by ASHA, {counts['error']} errored); {metric}: {better} is better"
    )
    out = out_dir(opts)
    figure = trials_figure(rows, spec.headline.step_key, metric, out / "trials.png", title, best)
    best_metrics = {k: best.metrics.get(k) for k in metric_cols if k != spec.headline.step_key} if best else None
    summary = {
        "name": opts.name,
        "kind": spec.kind,
        "counts": counts,
        "best_trial": best.trial_id if best else None,
        "best_config": best.config if best else None,
        "best_metrics": best_metrics,
        "parent_run_id": outcome.parent,
        **extra.summary,
    }
    finish_sweep(
        outcome,
        opts,
        stem="summary",
        title=title,
        table_rows=table_rows,
        columns=["trial", "outcome", *spec.space, *metric_cols, "best"],
        summary=summary,
        notes=[*extra.notes, *error_notes(rows)],
        figures=[figure, *extra.files],
        parent_metrics={f"best_{k}": v for k, v in (best_metrics or {}).items() if number(v)},
        parent_tags={"best_trial": summary["best_trial"] or "none", **extra.parent_tags},
        failed=None
        if best is not None
        else f"no trial of sweep {opts.name} finished ({counts['error']} errored, {counts['stopped']} stopped); see "
        f"the errors above and {out / 'summary.md'}",
    )
    return summary
