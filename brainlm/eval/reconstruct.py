"""``brainlm reconstruct``: masked-patch R^2 on held-out recordings, beside the baselines.

Protocol: every crop of the evaluation split (first window of each), one seeded mask per window and masking
strategy (identical across runs and models), R^2 over the masked values only, unclipped: pooled over all
of them (the paper's single number) and per parcel. Baselines, each from the same visible values:

- zero:    predict 0 (the training median after robust scaling)
- mean:    each parcel's training mean
- interp:  linear interpolation in time between the parcel's visible patches (edges held)
- ridge:   linear spatial imputation: the masked parcels at each patch from the visible parcels at the same
           timepoints, E[x_M | x_V] = mu_M + C_MV (C_VV + lam I)^-1 (x_V - mu_V), C and mu fitted on the
           training split and lam chosen on the validation split. The strong one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainlm.eval.common import Context, fixed_masks, load_context, split_windows, table, write_metrics
from brainlm.model.config import MASKINGS

METHODS = ("model", "zero", "mean", "interp", "ridge")


def time_mask(mask_BL: torch.Tensor, R: int, N: int, P: int) -> np.ndarray:
    """Token mask -> [B, R, T] bool (True = masked timepoint)."""
    return mask_BL.reshape(-1, R, N, 1).expand(-1, R, N, P).reshape(-1, R, N * P).numpy().astype(bool)


class Ridge:
    """Gaussian conditional expectation with a ridge on the visible block, fitted on training windows."""

    def __init__(self, train_BRT: np.ndarray, lam: float = 0.1) -> None:
        flat = train_BRT.transpose(1, 0, 2).reshape(train_BRT.shape[1], -1).astype(np.float64)
        self.mu = flat.mean(axis=1)
        self.cov = np.cov(flat)
        self.lam = lam

    def predict(self, x_BRT: np.ndarray, tmask_BRT: np.ndarray, P: int) -> np.ndarray:
        out = x_BRT.astype(np.float64).copy()
        B, R, T = x_BRT.shape
        scale = np.trace(self.cov) / R
        for b in range(B):
            for n in range(T // P):
                sl = slice(n * P, (n + 1) * P)
                masked = tmask_BRT[b, :, n * P]
                if not masked.any():
                    continue
                vis = ~masked
                if not vis.any():
                    out[b, :, sl] = self.mu[:, None]
                    continue
                c_vv = self.cov[np.ix_(vis, vis)] + self.lam * scale * np.eye(int(vis.sum()))
                w = np.linalg.solve(c_vv, self.cov[np.ix_(vis, masked)])  # [V, M]
                out[b, masked, sl] = self.mu[masked, None] + w.T @ (x_BRT[b, vis, sl] - self.mu[vis, None])
        return out


def interpolate(x_BRT: np.ndarray, tmask_BRT: np.ndarray, fallback_R: np.ndarray) -> np.ndarray:
    out = x_BRT.astype(np.float64).copy()
    t = np.arange(x_BRT.shape[2])
    for b in range(x_BRT.shape[0]):
        for r in range(x_BRT.shape[1]):
            m = tmask_BRT[b, r]
            if not m.any():
                continue
            if m.all():
                out[b, r] = fallback_R[r]
            else:
                out[b, r, m] = np.interp(t[m], t[~m], x_BRT[b, r, ~m])
    return out


def r2_parts(pred: np.ndarray, x: np.ndarray, tmask: np.ndarray) -> tuple[float, np.ndarray]:
    """Pooled R^2 over masked values, and R^2 per parcel (NaN where a parcel has no masked value)."""
    err = (pred - x) ** 2
    pooled_sst = ((x[tmask] - x[tmask].mean()) ** 2).sum()
    pooled = 1 - err[tmask].sum() / pooled_sst
    per = np.full(x.shape[1], np.nan)
    for r in range(x.shape[1]):
        m = tmask[:, r]
        if m.sum() > 1:
            v = x[:, r][m]
            sst = ((v - v.mean()) ** 2).sum()
            per[r] = 1 - err[:, r][m].sum() / sst if sst > 0 else np.nan
    return float(pooled), per


@torch.no_grad()
def model_predict(ctx: Context, x_BRT: torch.Tensor, mask_BL: torch.Tensor, batch: int = 16) -> np.ndarray:
    model, R = ctx.model.eval(), x_BRT.shape[1]
    out = []
    for i in range(0, x_BRT.shape[0], batch):
        res = model(x_BRT[i : i + batch], ctx.coords_R3, mask_BL=mask_BL[i : i + batch])
        out.append(model.unpatchify(res.pred_BLP, R))
    return torch.cat(out).numpy().astype(np.float64)


def fit_baselines(ctx: Context, train_limit: int = 512, val_limit: int = 64, mask_ratio: float = 0.5):
    """Training mean and a ridge whose strength is chosen on validation windows (random masking)."""
    train, _ = split_windows(ctx, ctx_split(ctx, "train"), train_limit)
    train_np = train.numpy()
    mean_R = train_np.mean(axis=(0, 2))
    ridge = Ridge(train_np)
    val_split = ctx_split(ctx, "val")
    val, _ = split_windows(ctx, val_split, val_limit)
    cfg = ctx.model.config
    R = val.shape[1]
    tmask = time_mask(fixed_masks(ctx.model, val.shape[0], R, mask_ratio, "random"), R, cfg.num_patches, cfg.patch_size)
    best = None
    for lam in (1e-3, 1e-2, 1e-1, 1.0):
        ridge.lam = lam
        score = r2_parts(ridge.predict(val.numpy(), tmask, cfg.patch_size), val.numpy().astype(np.float64), tmask)[0]
        if best is None or score > best[0]:
            best = (score, lam)
    ridge.lam = best[1]
    return mean_R, ridge


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
) -> dict[str, Any]:
    """Run the protocol; writes metrics.json and figures into ``out``; returns the metrics."""
    from brainlm.eval import plots

    ctx = load_context(model, shards)
    cfg = ctx.model.config
    ratio = cfg.mask_ratio if mask_ratio is None else mask_ratio
    x, _ = split_windows(ctx, split, limit)
    x_np = x.numpy().astype(np.float64)
    B, R, _ = x.shape
    mean_R, ridge = fit_baselines(ctx, mask_ratio=ratio)
    metrics: dict[str, Any] = {
        "split": split,
        "windows": B,
        "parcels": R,
        "timepoints": cfg.num_timepoints,
        "mask_ratio": ratio,
        "ridge_lambda": ridge.lam,
        "pooled_r2": {},
        "per_parcel_r2": {},
        "model": str(ctx.model_dir),
    }
    rows = []
    per_parcel_random = {}
    for masking in strategies:
        mask_BL = fixed_masks(ctx.model, B, R, ratio, masking)
        tmask = time_mask(mask_BL, R, cfg.num_patches, cfg.patch_size)
        preds = {
            "model": model_predict(ctx, x, mask_BL),
            "zero": np.zeros_like(x_np),
            "mean": np.broadcast_to(mean_R[None, :, None], x_np.shape),
            "interp": interpolate(x_np, tmask, mean_R),
            "ridge": ridge.predict(x_np, tmask, cfg.patch_size),
        }
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
        best_baseline = max((m for m in METHODS if m != "model"), key=lambda m: metrics["pooled_r2"][masking][m])
        rows.append(
            {
                "masking": masking,
                **metrics["pooled_r2"][masking],
                "winner": "model"
                if metrics["pooled_r2"][masking]["model"] > metrics["pooled_r2"][masking][best_baseline]
                else best_baseline,
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
            ["masking", *METHODS, "winner"],
            f"masked-patch R^2 on {B} {split} windows (pooled over masked values, unclipped; mask ratio {ratio})",
        )
    )
    return metrics
