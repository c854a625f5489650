"""Perturbation sweeps: ASHA over PerturbConfig knobs, every trial running ``optimise`` on source and target windows
chosen once on the driver, scored by ``perturb_score``; the best trial's perturbation is kept (``PERTURB``, a
``ConfigSweep``)."""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from ray import tune

from brainlm.eval.common import Context, jsonable, parse_where, recordings
from brainlm.eval.perturb import PerturbConfig, magnitude, optimise, top_report
from brainlm.exceptions import ConfigError, NonFiniteLossError
from brainlm.tuning.options import SweepOptions
from brainlm.tuning.ranked import ConfigSweep, Inputs, Report, run_config_sweep
from brainlm.tuning.session import in_trial
from brainlm.tuning.space import PERTURB_FIXED, apply_config
from brainlm.tuning.template import SweepOutcome, out_dir
from brainlm.tuning.trials import fmt_config

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


def perturb_inputs(
    ctx: Context, base: PerturbConfig, space: dict, opts: SweepOptions, budget: float = 0.1, **_: Any
) -> Inputs:
    """The source and target windows, chosen once and shared by every trial."""
    if budget <= 0:
        raise ConfigError(f"--theta-budget must be > 0, got {budget}")

    def windows(expr: str) -> np.ndarray:
        recs = recordings(ctx, base.split, where=parse_where(expr))
        return np.concatenate([r.windows_NRW for r in recs])[: base.max_windows]

    source, target = windows(base.source), windows(base.target)
    return Inputs(
        trial_args={"ctx": ctx, "source": source, "target": target, "base": base, "budget": budget},
        subject=f"{base.source} -> {base.target}",
        intro=f"{base.source} -> {base.target} ({len(source)} source, {len(target)} target windows); score = reached "
        f"- max(0, mean|theta| - {budget:g}) / {budget:g}, higher is better",
        max_t=int(space["steps"].largest()) if "steps" in space else base.steps,
        metrics=["step", "score", "reached", "mean_abs_theta"],
        show=("reached", "mean_abs_theta"),
        params={"theta_budget": budget},
    )


def keep_best_perturbation(
    outcome: SweepOutcome,
    table_rows: list[dict[str, Any]],
    ctx: Context,
    base: PerturbConfig,
    opts: SweepOptions,
    lineage: dict[str, Any],
    budget: float = 0.1,
) -> Report:
    """The best trial's theta and per-parcel report beside the summary, and the command that reruns it with figures;
    a finished trial's row shows the steps it ran."""
    for row, r in zip(table_rows, outcome.rows, strict=True):
        if r.outcome == "finished":
            row["step"] = int(apply_config(base, r.config).steps)
    report = Report(summary={"theta_budget": budget})
    best = outcome.best
    if best is None:
        return report
    out = out_dir(opts)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(best.checkpoint.to_directory(tmp))
        detail = json.loads((folder / "perturbation.json").read_text())
        (out / "best_perturbation.json").write_text(json.dumps(detail, indent=1))
        np.save(out / "best_theta.npy", np.load(folder / "theta.npy"))
    report.files += [out / "best_perturbation.json", out / "best_theta.npy"]
    cfg = apply_config(base, best.config)
    rerun = (
        f"brainlm perturb --model {outcome.spec.fixed['model']} --shards {outcome.spec.fixed['shards']} "
        f"--out runs/perturb/{opts.name} --source {cfg.source} --target {cfg.target} --form {cfg.form} "
        f"--pooling {cfg.pooling} --l1 {cfg.l1:.6g} --lr {cfg.lr:.6g} --steps {cfg.steps}"
    )
    report.summary |= {"top_parcels": detail.get("top_parcels"), "rerun": rerun}
    report.notes.append(
        f"best trial {best.trial_id}: top parcels {', '.join(detail.get('top_parcels', [])[:10])}; "
        f"figures and the full report: {rerun}"
    )
    return report


PERTURB = ConfigSweep(
    kind="perturb",
    config=PerturbConfig,
    fixed=PERTURB_FIXED,
    trial=perturb_trial,
    metric="score",
    mode="max",
    step_key="step",
    grace=40,
    name="perturb",
    inputs=perturb_inputs,
    report=keep_best_perturbation,
)


def perturb_sweep(
    model: str, shards: str, base: PerturbConfig, space_path: str | Path, opts: SweepOptions, budget: float = 0.1
) -> dict[str, Any]:
    """ASHA over the knobs of ``space_path``, scored by ``perturb_score`` with sparsity budget ``budget``; logs to
    MLflow; keeps the best trial's perturbation."""
    return run_config_sweep(PERTURB, model, shards, base, space_path, opts, budget=budget)
