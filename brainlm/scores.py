"""The coefficient of determination, one definition for every R^2 brainlm reports: 1 - SSE / SST, SST around the
pooled target mean, unclipped, from sums (squared error, target, target squared, count), so it adds up across
batches, ranks, windows and folds. The masked-reconstruction protocol (``brainlm.protocol.r2``), a model's
``reconstruct`` and the fine-tuned heads' regression scores all compute it here."""

from __future__ import annotations

import numpy as np


def pooled_r2(sse, s1, s2, n):
    """1 - SSE / SST from sums (scalars or arrays of resamples); NaN where the target has no variance."""
    sst = np.asarray(s2, dtype=np.float64) - np.asarray(s1, dtype=np.float64) ** 2 / np.maximum(n, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sst > 0, 1.0 - np.asarray(sse, dtype=np.float64) / sst, np.nan)


def r2_score(pred: np.ndarray, target: np.ndarray) -> float:
    """R^2 of predictions of ``target`` (any shape, every value counted), by ``pooled_r2``."""
    pred, target = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    return float(pooled_r2(((pred - target) ** 2).sum(), target.sum(), (target**2).sum(), target.size))
