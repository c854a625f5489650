"""Scaling sweeps: width x depth x mask ratio at fixed compute budgets, every trial running ``pretrain.run``."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from ray import tune

from brainlm import plots
from brainlm.eval.common import table
from brainlm.exceptions import ConfigError
from brainlm.model import BrainLM
from brainlm.training.recipe import build_recipe, global_batch
from brainlm.tuning.options import SweepOptions
from brainlm.tuning.report import error_notes, finish_sweep
from brainlm.tuning.session import in_trial
from brainlm.tuning.space import ROOT
from brainlm.tuning.template import SweepSpec, default_name, out_dir, run_sweep
from brainlm.tuning.trials import Headline, number

# -- scaling sweeps -----------------------------------------------------------------------------------------


# Recipe keys every scaling run sets itself (from the grid and the budget, and a folder per trial).
SWEEP_SETS = {
    "model.hidden_size",
    "model.num_layers",
    "model.num_heads",
    "model.intermediate_size",
    "model.mask_ratio",
    "train.max_steps",
    "train.out_dir",
    "train.resume",
    "train.export",
    "tracking.enabled",
}


@dataclass
class Shape:
    """One point of a scaling sweep: a model shape, its mask ratio and its compute budget."""

    width: int
    depth: int
    heads: int
    mlp: int
    mask_ratio: float
    budget: float
    params: int
    flops_per_sample: float
    global_batch: int
    steps: int

    @property
    def flops(self) -> float:
        """Training FLOPs actually spent (steps are whole, so at most the budget)."""
        return self.steps * self.global_batch * self.flops_per_sample

    def overrides(self) -> dict[str, Any]:
        return {
            "model.hidden_size": self.width,
            "model.num_layers": self.depth,
            "model.num_heads": self.heads,
            "model.intermediate_size": self.mlp,
            "model.mask_ratio": self.mask_ratio,
            "train.max_steps": self.steps,
        }


def plan_shape(
    recipe, num_parcels: int, width: int, depth: int, mask_ratio: float, budget: float, head_dim: int
) -> Shape:
    """The shape's heads (width // head_dim), MLP width (the recipe's MLP ratio), FLOPs and steps."""
    heads = max(1, width // head_dim)
    if width % heads:
        raise ConfigError(
            f"--widths {width}: not divisible by its {heads} heads (width // --head-dim {head_dim}); "
            f"use widths that are multiples of --head-dim"
        )
    ratio = recipe.model.mlp_dim / recipe.model.hidden_size
    mlp = max(1, round(ratio * width))
    cfg = dataclasses.replace(
        recipe.model,
        hidden_size=width,
        num_layers=depth,
        num_heads=heads,
        intermediate_size=mlp,
        mask_ratio=mask_ratio,
        num_parcels=num_parcels,
    )
    with torch.device("meta"):  # counts only: no memory for the weights
        model = BrainLM(cfg)
    fps = model.flops_per_sample(mask_ratio, num_parcels)
    gb = global_batch(recipe, 1)
    steps = int(budget // (fps * gb))
    if steps < 1:
        raise ConfigError(
            f"--budget {budget:.3g} FLOPs is less than one step of width {width} x depth {depth} (mask ratio "
            f"{mask_ratio}): {fps * gb:.3g} FLOPs per step ({fps:.3g} per sample x global batch {gb}); raise --budget"
        )
    return Shape(width, depth, heads, mlp, mask_ratio, budget, model.num_params(), fps, gb, steps)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scale_trial(
    config: dict[str, Any],
    raw_recipe: dict[str, Any],
    overrides: dict[str, Any],
    ds_config: dict[str, Any],
    num_parcels: int,
    head_dim: int,
    val_points: int,
    threads: int,
) -> None:
    """One trial: ``pretrain.run`` of one shape for its budget, in this process as a world of one; reports the
    validation curve (step, FLOPs spent, masked R^2) and the final numbers."""
    from brainlm.training.pretrain import run

    in_trial(threads)
    recipe = build_recipe(raw_recipe, overrides)
    shape = plan_shape(
        recipe,
        num_parcels,
        int(config["width"]),
        int(config["depth"]),
        float(config["mask_ratio"]),
        float(config["budget"]),
        head_dim,
    )
    out_dir = Path(tune.get_context().get_trial_dir()) / "run"
    cfg = build_recipe(
        raw_recipe,
        {
            **overrides,
            **shape.overrides(),
            "train.out_dir": str(out_dir),
            "train.resume": "auto",
            "train.val_every": max(1, shape.steps // val_points),
            "train.log_every": max(1, shape.steps // 20),
            "train.export": False,
            "tracking.enabled": False,
        },
    )
    # A world of one per trial, on its own port (trials share the machine), with the threads Ray gave it.
    os.environ.update(
        {
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()),
            "OMP_NUM_THREADS": str(max(1, threads)),
        }
    )
    result = run(cfg, ds_config)
    losses: dict[int, float] = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            losses[row["step"]] = row["loss"]
    for step, r2 in sorted(result.val_r2.items()):
        loss = losses.get(max((s for s in losses if s <= step), default=-1))
        tune.report(
            {
                "step": step,
                "flops": step * shape.flops_per_sample * shape.global_batch,
                "val_masked_r2": r2,
                **({"loss": loss} if loss is not None else {}),
            }
        )
    final = result.val_r2[max(result.val_r2)]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "metrics.jsonl").write_text((out_dir / "metrics.jsonl").read_text())
        (Path(tmp) / "recipe.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        tune.report(
            {
                "val_masked_r2": final,
                "params": shape.params,
                "flops": shape.flops,
                "steps": shape.steps,
                "flops_per_sample": shape.flops_per_sample,
                "heads": shape.heads,
                "finished": 1,
            },
            checkpoint=tune.Checkpoint.from_directory(tmp),
        )


def scale_sweep(
    shards: str,
    widths: list[int],
    depths: list[int],
    mask_ratios: list[float],
    budgets: list[float],
    opts: SweepOptions,
    recipe_path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    ds_config: str | Path = ROOT / "ds_config.json",
    head_dim: int = 32,
    val_points: int = 4,
) -> dict[str, Any]:
    """Width x depth x mask ratio x budget, one short pretraining run each; figure + tables + MLflow."""
    from brainlm.training.plan import preflight

    if not (widths and depths and mask_ratios and budgets):
        raise ConfigError("--widths, --depths, --mask-ratios and --budget each need at least one value")
    if head_dim < 1 or val_points < 1:
        raise ConfigError(f"--head-dim and --val-points must be at least 1, got {head_dim} and {val_points}")
    raw = {}
    if recipe_path is not None:
        if not Path(recipe_path).exists():
            raise ConfigError(f"--recipe {recipe_path} does not exist; recipes live in configs/pretrain/")
        raw = yaml.safe_load(Path(recipe_path).read_text()) or {}
    taken = sorted(set(overrides or {}) & SWEEP_SETS)
    if taken:
        raise ConfigError(
            f"{', '.join('--' + k for k in taken)}: set by the sweep for every run (--widths, --depths, --mask-ratios, "
            "--budget, --head-dim and a folder per trial); drop the flag"
        )
    # trials run in their own working folders (and on other machines): a local path must be absolute
    overrides = {**(overrides or {}), "data.shards": shards if "://" in shards else str(Path(shards).resolve())}
    recipe = build_recipe(raw, overrides)
    pre = preflight(recipe, ds_config)  # the checks every trial's pretraining makes, once, before any trial
    manifest, ds, R = pre.manifest, pre.ds_config, pre.num_parcels
    plan = [
        plan_shape(recipe, R, w, d, m, b, head_dim)
        for b in budgets
        for w in widths
        for d in depths
        for m in mask_ratios
    ]  # every point valid, or stop here
    opts.name = opts.name or default_name("scale")
    plan_table = table(
        [
            {
                "width": s.width,
                "depth": s.depth,
                "heads": s.heads,
                "mask_ratio": s.mask_ratio,
                "budget": f"{s.budget:.3g}",
                "params": s.params,
                "flops/sample": f"{s.flops_per_sample:.3g}",
                "steps": s.steps,
            }
            for s in plan
        ],
        ["width", "depth", "heads", "mask_ratio", "budget", "params", "flops/sample", "steps"],
        "plan",
    )
    spec = SweepSpec(
        kind="scale",
        trial=scale_trial,
        trial_args={
            "raw_recipe": raw,
            "overrides": overrides,
            "ds_config": ds,
            "num_parcels": R,
            "head_dim": head_dim,
            "val_points": val_points,
            "threads": int(max(1, opts.cpus_per_trial)),
        },
        space={
            "width": tune.grid_search(widths),
            "depth": tune.grid_search(depths),
            "mask_ratio": tune.grid_search(mask_ratios),
            "budget": tune.grid_search(budgets),
        },
        headline=Headline("val_masked_r2", "max", "step", ("params", "steps")),
        intro=f"scale sweep {opts.name}: {len(plan)} runs ({len(widths)} widths x {len(depths)} depths x "
        f"{len(mask_ratios)} mask ratios x {len(budgets)} budgets), {R} parcels, global batch "
        f"{plan[0].global_batch}; steps = budget / (FLOPs per sample x global batch)\n{plan_table}",
        parent_params={
            "shards": shards,
            "recipe": str(recipe_path),
            "overrides": overrides,
            "widths": widths,
            "depths": depths,
            "mask_ratios": mask_ratios,
            "budgets": budgets,
            "head_dim": head_dim,
            "global_batch": plan[0].global_batch,
        },
        parent_tags={"manifest_sha256": manifest.plan_sha256},
        fixed={"recipe": str(recipe_path), **overrides},
        grid=True,
    )
    outcome = run_sweep(spec, opts)
    rows = outcome.rows
    by_point = {(s.width, s.depth, s.mask_ratio, s.budget): s for s in plan}
    table_rows = []
    for r in rows:
        key = (int(r.config["width"]), int(r.config["depth"]), float(r.config["mask_ratio"]), float(r.config["budget"]))
        s = by_point.get(key) or plan_shape(recipe, R, *key, head_dim)
        table_rows.append(
            {
                "trial": r.trial_id,
                "budget": s.budget,
                "width": s.width,
                "depth": s.depth,
                "heads": s.heads,
                "mask_ratio": s.mask_ratio,
                "params": s.params,
                "steps": s.steps,
                "flops": s.flops,
                "val_masked_r2": r.metrics.get("val_masked_r2", "") if r.outcome == "finished" else "",
                "outcome": r.outcome,
            }
        )
    table_rows.sort(key=lambda x: (x["budget"], x["width"], x["depth"], x["mask_ratio"]))
    winners = []
    for b in sorted(set(budgets)):
        done = [x for x in table_rows if x["budget"] == b and number(x["val_masked_r2"])]
        if done:
            w = max(done, key=lambda x: x["val_masked_r2"])
            w["wins"] = "*"
            winners.append(
                {
                    "budget": b,
                    "width": w["width"],
                    "depth": w["depth"],
                    "mask_ratio": w["mask_ratio"],
                    "params": w["params"],
                    "val_masked_r2": w["val_masked_r2"],
                }
            )
    counts = outcome.counts
    columns = [
        "budget",
        "width",
        "depth",
        "heads",
        "mask_ratio",
        "params",
        "steps",
        "flops",
        "val_masked_r2",
        "outcome",
        "wins",
    ]
    title = (
        f"scale sweep {opts.name}: validation masked R^2 (fixed masks, higher is better) at fixed training "
        f"compute; {counts['finished']} of {counts['trials']} runs finished"
    )
    notes = [
        f"budget {w['budget']:.3g} FLOPs: width {w['width']} x depth {w['depth']}, mask ratio "
        f"{w['mask_ratio']} wins (val masked R^2 {w['val_masked_r2']:.4f}, {w['params']} params)"
        for w in winners
    ] + error_notes(rows)
    out = out_dir(opts)
    summary = {
        "name": opts.name,
        "kind": "scale",
        "counts": counts,
        "winners": winners,
        "parent_run_id": outcome.parent,
        "num_parcels": R,
        "global_batch": plan[0].global_batch,
    }
    figures = (
        [plots.scaling_figure(table_rows, out / "scaling.png")]
        if any(number(x["val_masked_r2"]) for x in table_rows)
        else []
    )
    finish_sweep(
        outcome,
        opts,
        stem="scaling",
        title=title,
        table_rows=table_rows,
        columns=columns,
        summary=summary,
        notes=notes,
        figures=figures,
        parent_metrics={
            f"best_val_masked_r2_at_{w['budget']:.3g}".replace("+", ""): w["val_masked_r2"] for w in winners
        },
        parent_tags={
            "winners": "; ".join(f"{w['budget']:.3g}: w{w['width']} d{w['depth']} m{w['mask_ratio']}" for w in winners)
            or "none"
        },
        failed=None
        if winners
        else f"no run of sweep {opts.name} finished; see the errors above and {out / 'scaling.md'}",
    )
    return summary
