"""``brainlm reconstruct``: masked-patch R^2 on held-out recordings, beside the baselines.

Protocol: every crop of the evaluation split (first window of each), one seeded mask per window and masking
strategy (identical across runs and models), R^2 over the masked values only, unclipped: pooled over all
of them (the paper's single number) and per parcel. Baselines (brainlm/eval/baselines.py), each from the same
visible values: zero, the parcel's training mean, linear interpolation in time, ridge (the visible parcels at the
same timepoint) and spatiotemporal (those and the parcel's own visible neighbouring patches): the last two are
conditional expectations under a Gaussian model fitted on the training split, their ridge strength chosen on the
validation split for each masking strategy. The strongest of them is the bar the model must clear.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from brainlm.eval.baselines import REACH, GaussianImputer, interpolate, r2_parts, time_mask
from brainlm.eval.common import Context, load_context, split_windows, table, write_metrics
from brainlm.eval.metrics import fixed_masks
from brainlm.exceptions import InputError
from brainlm.model import prior
from brainlm.model.config import MASKINGS

METHODS = ("model", "zero", "mean", "interp", "ridge", "spatiotemporal", "adaptive")


@torch.no_grad()
def model_predict(ctx: Context, x_BRT: torch.Tensor, mask_BL: torch.Tensor, batch: int = 16) -> np.ndarray:
    model, R = ctx.model.eval(), x_BRT.shape[1]
    out = []
    for i in range(0, x_BRT.shape[0], batch):
        with ctx.autocast():
            res = model(
                x_BRT[i : i + batch].to(ctx.device), ctx.coords_R3, mask_BL=mask_BL[i : i + batch].to(ctx.device)
            )
        out.append(model.unpatchify(res.pred_BLP.float(), R).cpu())
    return torch.cat(out).numpy().astype(np.float64)


LAMBDAS = (1e-3, 1e-2, 1e-1, 1.0)
ALPHAS = (0.1, 0.25, 0.5, 0.75)
# The linear baselines: the GaussianImputer method each runs, and the grid its settings are chosen from.
LINEAR = {
    "ridge": ("spatial", {"lam": LAMBDAS}),
    "spatiotemporal": ("spatiotemporal", {"lam": LAMBDAS}),
    "adaptive": ("adaptive", {"lam": LAMBDAS, "alpha": ALPHAS}),
}


@dataclass
class Baselines:
    """The fitted baselines and, per masking strategy, the settings each linear one chose on validation."""

    mean_R: np.ndarray
    gaussian: GaussianImputer
    val_BRT: np.ndarray
    mask_ratio: float
    chosen: dict[str, dict[str, dict[str, float]]]

    def predict(self, name: str, x_BRT: np.ndarray, tmask_BRT: np.ndarray, P: int, masking: str) -> np.ndarray:
        if name == "zero":
            return np.zeros(x_BRT.shape)
        if name == "mean":
            return np.broadcast_to(self.mean_R[None, :, None], x_BRT.shape)
        if name == "interp":
            return interpolate(x_BRT, tmask_BRT, self.mean_R)
        method = getattr(self.gaussian, LINEAR[name][0])
        return method(x_BRT, tmask_BRT, P, **self.settings_of(name, masking, P))

    def settings_of(self, name: str, masking: str, P: int) -> dict[str, float]:
        """A linear baseline's settings for a masking strategy: the best on the validation windows."""
        chosen = self.chosen.setdefault(name, {})
        if masking not in chosen:
            R, T = self.val_BRT.shape[1:]
            tmask = time_mask(fixed_masks(len(self.val_BRT), R, T // P, self.mask_ratio, masking), R, T // P, P)
            method_name, grid = LINEAR[name]
            method = getattr(self.gaussian, method_name)
            candidates = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
            bar = tqdm(candidates, desc=f"{name}: settings on {len(self.val_BRT)} val windows", leave=False)
            scores = [r2_parts(method(self.val_BRT, tmask, P, **c), self.val_BRT, tmask)[0] for c in bar]
            chosen[masking] = candidates[int(np.argmax(scores))]
        return chosen[masking]


def fit_baselines(
    ctx: Context, train_limit: int = prior.FIT_WINDOWS, val_limit: int = 64, mask_ratio: float = 0.5
) -> Baselines:
    """Means and the Gaussian model from training windows; ridge strengths are chosen on validation windows."""
    train, _ = split_windows(ctx, ctx_split(ctx, "train"), train_limit)
    train_np = train.numpy()
    val, _ = split_windows(ctx, ctx_split(ctx, "val"), val_limit)
    P = ctx.model.config.patch_size
    gaussian = GaussianImputer(train_np, max_lag=(2 * REACH + 1) * P)
    return Baselines(train_np.mean(axis=(0, 2)), gaussian, val.numpy().astype(np.float64), mask_ratio, {})


def ctx_split(ctx: Context, split: str) -> str:
    """A split that has samples: ``split`` itself, else train (tiny shard sets may lack val)."""
    return split if ctx.manifest.num_samples(split) else "train"


def reconstruct(
    model: str,
    shards: str,
    out: str | Path,
    split: str = "test",
    mask_ratio: float | None = None,
    strategies: tuple[str, ...] = MASKINGS,
    limit: int | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Run the protocol; writes metrics.json and figures into ``out``; returns the metrics."""
    from brainlm.eval import plots

    unknown = [m for m in strategies if m not in MASKINGS]
    if unknown or not strategies:
        raise InputError(
            f"masking strategies must be among {', '.join(MASKINGS)}; got {', '.join(strategies) or 'none'}"
        )
    ctx = load_context(model, shards, device)
    cfg = ctx.model.config
    ratio = cfg.mask_ratio if mask_ratio is None else mask_ratio
    x, _ = split_windows(ctx, split, limit)
    x_np = x.numpy().astype(np.float64)
    B, R, _ = x.shape
    baselines = fit_baselines(ctx, mask_ratio=ratio)
    metrics: dict[str, Any] = {
        "split": split,
        "windows": B,
        "parcels": R,
        "timepoints": cfg.num_timepoints,
        "mask_ratio": ratio,
        "baseline_settings": baselines.chosen,
        "pooled_r2": {},
        "per_parcel_r2": {},
        "model": str(ctx.model_dir) if ctx.model_dir else "a model given in memory",
    }
    rows = []
    per_parcel_random = {}
    N, P = x.shape[2] // cfg.patch_size, cfg.patch_size
    for masking in strategies:
        mask_BL = fixed_masks(B, R, N, ratio, masking)
        tmask = time_mask(mask_BL, R, N, P)
        preds = {"model": model_predict(ctx, x, mask_BL)}
        for name in tqdm(METHODS[1:], desc=f"baselines, {masking} masking", unit="baseline", leave=False):
            preds[name] = baselines.predict(name, x_np, tmask, P, masking)
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
        pooled = metrics["pooled_r2"][masking]
        best_baseline = max(METHODS[1:], key=lambda m: pooled[m])
        rows.append(
            {
                "masking": masking,
                **pooled,
                "margin": pooled["model"] - pooled[best_baseline],
                "winner": "model" if pooled["model"] > pooled[best_baseline] else best_baseline,
            }
        )
        if masking == strategies[0]:
            plots.reconstruction_figure(
                ctx.model, x[:1], ctx.coords_R3, Path(out) / "reconstruction.png", mask_BL=mask_BL[:1]
            )
    if per_parcel_random:
        plots.distribution_figure(
            per_parcel_random, Path(out) / "per_parcel_r2.png", "per-parcel masked R^2 (random masking)"
        )
    metrics["table"] = rows
    write_metrics(out, metrics)
    print(
        table(
            rows,
            ["masking", *METHODS, "margin", "winner"],
            f"masked-patch R^2 on {B} {split} windows (pooled over masked values, unclipped; mask ratio {ratio})",
        )
    )
    return metrics
