"""``brainlm reconstruct``: masked-patch R^2 on held-out recordings, beside the baselines, with intervals.

Protocol (``brainlm.protocol``; docs/evaluation.md): every crop of the evaluation split (first window of each), one
seeded mask per window and masking strategy (identical across runs and models), R^2 over the masked values only,
unclipped: pooled over all of them (the paper's single number) and per parcel. Baselines (brainlm/eval/baselines.py),
each from the same visible values: zero, the parcel's training mean, linear interpolation in time, ridge (the
visible parcels at the same timepoint), spatiotemporal (those and the parcel's own visible neighbouring patches) and
adaptive (ridge under the window's own covariance shrunk toward the population's): the last three are conditional
expectations under a Gaussian model, their settings chosen on the validation split for each masking strategy.

The baselines are fitted on the data the model saw. Always on the training split of the evaluated shards; and when
the model was pretrained on another shard set (its extra.json records it; ``source_shards`` names it explicitly),
also on that set's training split (``ridge@source``, ...) and on both together (``ridge@both``, ...). A source on
another atlas is carried onto the evaluated one by parcel centres first (``baselines.map_windows``): the model places
parcels by their coordinates, and so may its baselines. The strongest of them all is the bar: the margin is the
model's R^2 minus the best baseline's, with paired bootstrap intervals over windows and over subjects, and the winner
is named only when the intervals exclude 0 (``brainlm.protocol.intervals``); otherwise it is a tie. metrics.json
says what each side was fitted on and keeps every window's sums, so folds and resamples can be pooled later
(``brainlm benchmark``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainlm import progress
from brainlm.data.loader import fixed_samples
from brainlm.data.shardset import ShardSet
from brainlm.eval.baselines import CONTEXT_BASELINES, Baselines, map_windows
from brainlm.eval.common import Context, comparison_table, load_context, split_windows, table, write_metrics
from brainlm.exceptions import BrainLMError, InputError
from brainlm.masking import MASKINGS
from brainlm.model import prior
from brainlm.model.inference import tr_of
from brainlm.model.io import trained_on
from brainlm.protocol import (
    WindowSums,
    best,
    compare,
    context_label,
    context_statistics,
    context_windows,
    model_masks,
    parse_context,
    r2_parts,
)

log = logging.getLogger(__name__)

SIMPLE = ("zero", "mean", "interp")
LINEAR_NAMES = ("ridge", "spatiotemporal", "adaptive")
METHODS = ("model", *SIMPLE, *LINEAR_NAMES)  # the columns on the evaluated shards' own training split


@torch.no_grad()
def model_predict(
    ctx: Context,
    x_BRT: torch.Tensor,
    mask_BL: torch.Tensor,
    context: list[list[int]] | None = None,
    batch: int = 16,
) -> np.ndarray:
    """The model's reconstruction; a model whose prior reads recording context (``model.prior_context``) gets each
    window's ``context`` windows' statistics, any other model its window alone."""
    model, R = ctx.model.eval(), x_BRT.shape[1]
    stats = None
    if model.config.prior_context and context is not None:
        cov_BRR, n_B = context_statistics(x_BRT.numpy(), context)
        stats = (torch.from_numpy(cov_BRR), torch.from_numpy(n_B))
    out = []
    for i in range(0, x_BRT.shape[0], batch):
        rows = slice(i, i + batch)
        part = None if stats is None else (stats[0][rows].to(ctx.device), stats[1][rows].to(ctx.device))
        with ctx.autocast():
            x = x_BRT[rows].to(ctx.device)
            res = model(
                x, ctx.coords_R3, mask_BL=mask_BL[rows].to(ctx.device), context=part, **tr_of(model, ctx.manifest.tr)
            )
        out.append(model.unpatchify(res.pred_BLP.float(), R).cpu())
    return torch.cat(out).numpy().astype(np.float64)


@dataclass
class FitSet:
    """Baselines fitted on one body of training data: ``target`` (the evaluated shards' training split),
    ``source`` (the training split of the shards the model was pretrained on) or ``both``."""

    name: str
    fitted_on: str
    baselines: Baselines
    context: bool = False  # the +ctx baselines too

    def columns(self) -> list[str]:
        own = (*SIMPLE, *LINEAR_NAMES) if self.name == "target" else LINEAR_NAMES
        own = (*own, *CONTEXT_BASELINES) if self.context else own
        return [n if self.name == "target" else f"{n}@{self.name}" for n in own]


def ctx_split(ctx: Context, split: str) -> str:
    """A split that has samples: ``split`` itself, else train (tiny shard sets may lack val)."""
    return split if ctx.manifest.num_samples(split) else "train"


def _describe(root: str, windows: int, subjects: int, split: str = "train") -> str:
    return f"the {split} split of {root} ({windows} windows, {subjects} subjects)"


def source_shards_of(ctx: Context, given: list[str] | None = None) -> list[str]:
    """The shard sets the model was pretrained on that are not the evaluated ones: ``given``, else what its
    extra.json records."""
    if given:
        return list(given)
    own_sha, own_root = ctx.manifest.plan_sha256, str(ctx.root).rstrip("/")
    return [
        str(r["shards"])
        for r in trained_on(ctx.model.extra)
        if r.get("manifest_sha256") != own_sha and str(r["shards"]).rstrip("/") != own_root
    ]


def source_windows(ctx: Context, sets: list[str], notes: list[str]) -> tuple[np.ndarray | None, str]:
    """Training windows of the source shard sets on the evaluated atlas, and what they are. A set on another atlas
    is carried onto this one by parcel centres (``baselines.map_windows``), as the model places parcels by them."""
    parts, described = [], []
    atlas = ctx.manifest.atlas
    for url in sets:
        try:
            source = ShardSet.open(url)
        except (BrainLMError, OSError) as err:
            notes.append(
                f"the model's pretraining shards {url} cannot be read ({err}); its baselines are fitted on this "
                "shard set only: pass --source-shards to fit them on what the model saw too"
            )
            continue
        manifest = source.manifest
        n = min(manifest.num_samples("train"), prior.FIT_WINDOWS)
        if n == 0:
            notes.append(f"{url} has no training windows to fit baselines on")
            continue
        x, meta = fixed_samples(source, "train", n, ctx.model.config.num_timepoints)
        x = x.numpy()
        what = _describe(source.root, len(x), len({m["subject"] for m in meta}))
        same = manifest.atlas.labels == atlas.labels and np.allclose(manifest.atlas.coords(), atlas.coords(), atol=1e-3)
        if not same:
            x, sigma = map_windows(x, manifest.atlas.coords(), atlas.coords())
            what += f", carried from {manifest.atlas.name} ({manifest.atlas.num_parcels} parcels) by parcel centres"
            notes.append(
                f"the model was pretrained on {url} with another atlas ({manifest.atlas.name}, "
                f"{manifest.atlas.num_parcels} parcels): the @source baselines see those windows carried onto "
                f"{atlas.name} by parcel centres (Gaussian kernel, sigma {sigma:.1f} mm)"
            )
        parts.append(x.astype(np.float32))
        described.append(what)
    if not parts:
        return None, ""
    return np.concatenate(parts), " + ".join(described)


def fit_baselines(
    ctx: Context,
    mask_ratio: float = 0.5,
    train_limit: int = prior.FIT_WINDOWS,
    val_limit: int = 64,
    source_shards: list[str] | None = None,
    context: int | None = 0,
) -> tuple[list[FitSet], list[str]]:
    """Baselines fitted on the evaluated shards' training split, and on the model's pretraining data when that is
    another shard set (and on both). Settings are chosen on the validation windows, with ``context`` (K nearest, all:
    None, none: 0) other windows of their recordings for the +ctx baselines."""
    model, P = ctx.model, ctx.model.value_block
    train_split, val_split = ctx_split(ctx, "train"), ctx_split(ctx, "val")
    train, train_meta = split_windows(ctx, train_split, train_limit)
    val, val_meta = split_windows(ctx, val_split, val_limit)
    T = ctx.model.config.num_timepoints
    val_context = windows_context(val_meta, T, context)
    train_np, val_np = train.numpy(), val.numpy()
    subjects = len({m["subject"] for m in train_meta})
    sets = [FitSet("target", _describe(ctx.root, len(train_np), subjects, train_split), None)]
    notes: list[str] = []
    sources = source_shards_of(ctx, source_shards)
    src_np, src_desc = source_windows(ctx, sources, notes) if sources else (None, "")
    if src_np is not None:
        sets.append(FitSet("source", src_desc, None))
        sets.append(FitSet("both", f"{src_desc} + {sets[0].fitted_on}", None))
    data = {"target": train_np, "source": src_np}
    if src_np is not None:
        data["both"] = np.concatenate([src_np, train_np])
    R = val_np.shape[1]

    def value_masks(count: int, masking: str) -> np.ndarray:
        return model.value_mask(model_masks(model, count, R, mask_ratio, masking), R)

    for s in sets:
        s.baselines = Baselines.fit(data[s.name], val_np, mask_ratio, P, val_context, value_masks, ctx.device)
        s.context = context != 0
    return sets, notes


def windows_context(meta: list[dict], window: int, k: int | None) -> list[list[int]]:
    """The protocol's context of each evaluation window (``brainlm.protocol.context``), from its metadata."""
    return context_windows([m["recording"] for m in meta], [int(m["start"]) for m in meta], window, k)


def model_fitted_on(ctx: Context) -> dict[str, str]:
    """What the model's parts saw: its weights (pretraining) and its decoder prior."""
    recorded = trained_on(ctx.model.extra)
    runs: list[list[dict]] = []  # one run's shard sets together (a mixture), runs in order
    for r in recorded:
        if runs and r.get("mixture") and runs[-1][-1].get("mixture") == r.get("mixture"):
            runs[-1].append(r)
        else:
            runs.append([r])
    phrases = [
        f"the train split of {run[0]['shards']}"
        if len(run) == 1
        else "a mixture of the train splits of " + " + ".join(f"{r['shards']} ({r['weight']:.2f})" for r in run)
        for run in runs
    ]
    weights = "trained on " + (" then ".join(phrases) or "?")
    strength = ctx.model.config.prior_context
    out = {
        "weights": weights,
        "context": f"its prior reads the recording context (strength {strength:g} timepoints)"
        if strength
        else "none (the model sees its window only)",
    }
    if ctx.model.decoder_prior_embed is not None:
        # Fitted by the last run, on the train split of its sets of these shards' atlas (one prior per atlas).
        atlas = (ctx.manifest.atlas.name, ctx.manifest.atlas.num_parcels)
        sets = [r for r in runs[-1] if (r.get("atlas"), r.get("parcels")) == atlas] or runs[-1][:1] if runs else []
        fitted = ctx.prior_fitted_on or ("the train split of " + " + ".join(r["shards"] for r in sets) if sets else "?")
        out["prior"] = f"fitted on {fitted}"
    return out


def reconstruct(
    model: str,
    shards: str,
    out: str | Path,
    split: str = "test",
    mask_ratio: float | None = None,
    strategies: tuple[str, ...] = MASKINGS,
    limit: int | None = None,
    device: str | None = None,
    source_shards: list[str] | None = None,
    context: str | int | None = "all",
    refit_prior: bool = False,
) -> dict[str, Any]:
    """Run the protocol; writes metrics.json and figures into ``out``; returns the metrics. ``context``: the other
    windows of its recording each window's +ctx baselines see (0, K nearest, or all); ``refit_prior``: fit the
    decoder's prior on these shards' training split even when the model holds one for their atlas."""
    from brainlm import plots

    unknown = [m for m in strategies if m not in MASKINGS]
    if unknown or not strategies:
        raise InputError(
            f"masking strategies must be among {', '.join(MASKINGS)}; got {', '.join(strategies) or 'none'}"
        )
    ctx = load_context(model, shards, device, refit=refit_prior)
    own = tuple(m for m in strategies if m in ctx.model.maskings)
    if not own:
        raise InputError(
            f"the model masks by {', '.join(ctx.model.maskings)} only; got --masking {', '.join(strategies)}"
        )
    if own != tuple(strategies):
        skipped = [m for m in strategies if m not in own]
        log.info(f"note: the model has no {', '.join(skipped)} masking (it masks by {', '.join(own)}): skipped")
    strategies = own
    cfg = ctx.model.config
    ratio = cfg.mask_ratio if mask_ratio is None else mask_ratio
    x, meta = split_windows(ctx, split, limit)
    x_np = x.numpy().astype(np.float64)
    subjects_W = [m["subject"] for m in meta]
    B, R, _ = x.shape
    k = parse_context(context)
    test_context = windows_context(meta, cfg.num_timepoints, k)
    fit_sets, notes = fit_baselines(ctx, mask_ratio=ratio, source_shards=source_shards, context=k)
    for note in notes:
        log.info(f"note: {note}")
    baseline_names = [c for s in fit_sets for c in s.columns()]
    fitted_on = {"model": model_fitted_on(ctx), **{s.name: s.fitted_on for s in fit_sets}}
    metrics: dict[str, Any] = {
        "split": split,
        "windows": B,
        "subjects": sorted(set(subjects_W)),
        "parcels": R,
        "timepoints": cfg.num_timepoints,
        "mask_ratio": ratio,
        "context": context_label(k),
        "context_windows": float(np.mean([len(c) for c in test_context])) if test_context else 0.0,
        "fitted_on": fitted_on,
        "notes": notes,
        "baseline_settings": {s.name: s.baselines.chosen for s in fit_sets},
        "pooled_r2": {},
        "per_parcel_r2": {},
        "comparisons": {},
        "window_subjects": subjects_W,
        "window_recordings": [m["recording"] for m in meta],
        "window_sums": {},
        "model": str(ctx.model_dir) if ctx.model_dir else "a model given in memory",
    }
    verdicts: list = []
    per_parcel_random = {}
    P = ctx.model.value_block
    for masking in strategies:
        mask_BL = model_masks(ctx.model, B, R, ratio, masking)
        tmask = ctx.model.value_mask(mask_BL, R)
        preds = {"model": model_predict(ctx, x, mask_BL, test_context)}
        columns = [(s, c) for s in fit_sets for c in s.columns()]
        for s, column in progress.bar(columns, desc=f"baselines, {masking} masking", unit="baseline", inner=True):
            preds[column] = s.baselines.predict(column.split("@")[0], x_np, tmask, P, masking, test_context)
        sums = WindowSums.of(preds, x_np, tmask)
        metrics["window_sums"][masking] = sums.to_json()
        metrics["pooled_r2"][masking], metrics["per_parcel_r2"][masking] = {}, {}
        for name, pred in preds.items():
            pooled, per = r2_parts(pred, x_np, tmask)
            metrics["pooled_r2"][masking][name] = pooled
            metrics["per_parcel_r2"][masking][name] = {
                "mean": float(np.nanmean(per)),
                "median": float(np.nanmedian(per)),
                "values": per.round(5).tolist(),
            }
            if masking == "random":
                per_parcel_random[name] = per
        bar = best(sums, baseline_names)
        main = compare(sums, subjects_W, "model", bar)
        metrics["comparisons"][masking] = {
            "best_baseline": bar,
            "model_vs_best": main.to_json(),
            "model_vs": {b: compare(sums, subjects_W, "model", b).to_json() for b in baseline_names if b != bar},
        }
        verdicts.append(main)
        if masking == strategies[0]:
            plots.reconstruction_figure(
                ctx.model,
                x[:1],
                ctx.coords_R3,
                Path(out) / "reconstruction.png",
                mask_BL=mask_BL[:1],
                tr=ctx.manifest.tr,
            )
    if per_parcel_random:
        plots.distribution_figure(
            per_parcel_random, Path(out) / "per_parcel_r2.png", "per-parcel masked R^2 (random masking)"
        )
    # One row per masking: every method's R^2, the margin over the best baseline, its intervals and the winner.
    metrics["table"] = [
        {"masking": m, **metrics["pooled_r2"][m], "best_baseline": c.b, "margin": c.margin, "winner": c.winner}
        | {"interval_windows": list(c.windows), "interval_subjects": list(c.subjects) if c.subjects else None}
        for m, c in zip(strategies, verdicts, strict=True)
    ]
    write_metrics(out, metrics)
    title = (
        f"masked-patch R^2 on {B} {split} windows of {len(metrics['subjects'])} subject(s) (pooled over masked "
        f"values, unclipped; mask ratio {ratio}; context {metrics['context']}: "
        f"{metrics['context_windows']:.1f} other windows of the recording per window on average, for the +ctx rows)"
    )
    log.info(r2_table(metrics, strategies, title))
    log.info(comparison_table(verdicts, "pooled R^2", "windows", [f"{m}: " for m in strategies]))
    return metrics


def r2_table(metrics: dict[str, Any], strategies: tuple[str, ...], title: str) -> str:
    """One row per method: its pooled R^2 under each masking strategy and what it was fitted on (a legend below)."""
    rows = []
    for name in metrics["pooled_r2"][strategies[0]]:
        fit = "model" if name == "model" else "-" if name == "zero" else name.partition("@")[2] or "target"
        rows.append({"method": name, **{m: metrics["pooled_r2"][m][name] for m in strategies}, "fitted on": fit})
    legend = [f"  model {k}: {v}" for k, v in metrics["fitted_on"]["model"].items()]
    legend += [f"  {k}: {v}" for k, v in metrics["fitted_on"].items() if k != "model"]
    return table(rows, ["method", *strategies, "fitted on"], title) + "\nfitted on\n" + "\n".join(legend)
