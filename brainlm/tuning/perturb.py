"""Perturbation sweeps: ASHA over PerturbConfig knobs, every trial running ``optimise``."""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from ray import tune

from brainlm.eval.common import jsonable, load_context, parse_where, recordings
from brainlm.eval.perturb import PerturbConfig, magnitude, optimise, top_report
from brainlm.exceptions import ConfigError, NonFiniteLossError
from brainlm.tuning.options import SweepOptions
from brainlm.tuning.session import in_trial, trial_device
from brainlm.tuning.space import PERTURB_FIXED, apply_config, check_flags_vs_space, load_space
from brainlm.tuning.template import (
    asha,
    config_spec,
    default_name,
    finish_ranked,
    out_dir,
    run_sweep,
    trial_table,
)
from brainlm.tuning.trials import Headline, fmt_config

# -- perturbation sweeps ------------------------------------------------------------------------------------


def perturb_score(reached: float, mean_abs_theta: float, budget: float) -> float:
    """reached - max(0, mean|theta| - budget) / budget.

    ``reached`` is the share of the source-to-target embedding distance the perturbation closes (1: the
    target is reached, 0: nothing moved). The penalty is zero while the perturbation stays within the
    sparsity budget (mean |theta|, in robust-scaled signal units) and grows with the relative excess: twice the
    budget costs 1, the whole range of ``reached``. Higher is better."""
    return float(reached - max(0.0, mean_abs_theta - budget) / budget)


def perturb_trial(
    config: dict[str, Any],
    ctx,
    source: np.ndarray,
    target: np.ndarray,
    base: PerturbConfig,
    budget: float,
    threads: int,
    device: str = "cpu",
) -> None:
    """One trial: ``optimise`` with the trial's PerturbConfig; reports every 20 steps (for ASHA), then the
    final score with theta and the per-parcel report as the checkpoint."""
    in_trial(threads)
    cfg = apply_config(base, config)
    ctx.to(device)

    def report(step: int, m: dict[str, float]) -> None:
        if not math.isfinite(m["match"]):
            raise NonFiniteLossError(
                f"step {step}: the matching loss is {m['match']}; these settings diverge "
                f"({fmt_config(config)}): lower lr"
            )
        reached = 1.0 - m["match"]
        tune.report(
            {
                "step": step,
                "reached": reached,
                "mean_abs_theta": m["l1"],
                "score": perturb_score(reached, m["l1"], budget),
            }
        )

    theta, reach = optimise(ctx, source, target, cfg, report)
    mag = magnitude(theta, cfg.form)
    atlas = ctx.manifest.atlas
    top = top_report(mag, atlas.networks, atlas.labels, cfg.top_fraction)
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "theta.npy", theta.numpy())
        (Path(tmp) / "perturbation.json").write_text(
            json.dumps(
                {
                    "config": dataclasses.asdict(cfg),
                    **reach,
                    "magnitude": mag.round(6).tolist(),
                    "parcels": atlas.labels,
                    **top,
                },
                indent=1,
                default=jsonable,
            )
        )
        tune.report(
            {"score": perturb_score(reach["reached"], reach["mean_abs_theta"], budget), **reach, "finished": 1},
            checkpoint=tune.Checkpoint.from_directory(tmp),
        )


def perturb_sweep(
    model: str, shards: str, base: PerturbConfig, space_path: str | Path, opts: SweepOptions, budget: float = 0.1
) -> dict[str, Any]:
    """ASHA over the knobs of ``space_path``, scored by ``perturb_score``; logs to MLflow."""
    from brainlm.tracking.registry import lineage

    if budget <= 0:
        raise ConfigError(f"--theta-budget must be > 0, got {budget}")
    space = load_space(space_path, PerturbConfig, base, PERTURB_FIXED)
    check_flags_vs_space(space, base, space_path)
    opts.name = opts.name or default_name("perturb")
    pre = lineage(model)
    ctx = load_context(model, shards, "cpu")  # trials move it to their own device

    def windows(expr: str) -> np.ndarray:
        recs = recordings(ctx, base.split, where=parse_where(expr))
        return np.concatenate([r.windows_NRW for r in recs])[: base.max_windows]

    source, target = windows(base.source), windows(base.target)
    max_steps = int(space["steps"].largest()) if "steps" in space else base.steps
    spec = config_spec(
        "perturb",
        model,
        shards,
        base,
        space,
        opts,
        trial=perturb_trial,
        trial_args={
            "ctx": ctx,
            "source": source,
            "target": target,
            "base": base,
            "budget": budget,
            "threads": int(max(1, opts.cpus_per_trial)),
            "device": trial_device(opts),
        },
        headline=Headline("score", "max", "step", ("reached", "mean_abs_theta")),
        intro=f"perturb sweep {opts.name}: {base.source} -> {base.target} ({len(source)} source, {len(target)} target "
        f"windows), {opts.samples} sample(s) of {space_path}; score = reached - max(0, mean|theta| - {budget:g}) / "
        f"{budget:g}, higher is better",
        parent_params={"theta_budget": budget},
        parent_tags={"manifest_sha256": ctx.manifest.plan_sha256, **pre},
        scheduler=asha("step", max_steps, 40, opts),
    )
    outcome = run_sweep(spec, opts)
    best = outcome.best
    metric_cols = ["step", "score", "reached", "mean_abs_theta"]
    table_rows = trial_table(outcome.rows, list(space), metric_cols)
    for row, r in zip(table_rows, outcome.rows, strict=True):
        if r.outcome == "finished":
            row["step"] = int(apply_config(base, r.config).steps)
    out = out_dir(opts)
    summary: dict[str, Any] = {"theta_budget": budget}
    files, notes = [], []
    if best is not None:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(best.checkpoint.to_directory(tmp))
            detail = json.loads((folder / "perturbation.json").read_text())
            (out / "best_perturbation.json").write_text(json.dumps(detail, indent=1))
            np.save(out / "best_theta.npy", np.load(folder / "theta.npy"))
        files += [out / "best_perturbation.json", out / "best_theta.npy"]
        cfg = apply_config(base, best.config)
        rerun = (
            f"brainlm perturb --model {model} --shards {shards} --out runs/perturb/{opts.name} "
            f"--source {cfg.source} --target {cfg.target} --form {cfg.form} --pooling {cfg.pooling} "
            f"--l1 {cfg.l1:.6g} --lr {cfg.lr:.6g} --steps {cfg.steps}"
        )
        summary |= {"top_parcels": detail.get("top_parcels"), "rerun": rerun}
        notes.append(
            f"best trial {best.trial_id}: top parcels {', '.join(detail.get('top_parcels', [])[:10])}; "
            f"figures and the full report: {rerun}"
        )
    return finish_ranked(
        outcome, opts, f"{base.source} -> {base.target}", table_rows, metric_cols, summary, notes, files
    )
