"""The masked-reconstruction R^2, one definition: pooled over every masked value, unclipped (the paper's single
number, without its clipping at 0), 1 - SSE / SST with SST around the pooled target mean. It is computed from sums
(squared error, target, target squared, count) so it adds up across batches, ranks, windows and folds: the pooled
R^2 of any set of windows, a bootstrap resample included, comes from the sums of its windows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from brainlm.scores import pooled_r2


@dataclass
class R2Sums:
    """Sums over masked values: squared error, target, target squared, count."""

    sse: float = 0.0
    s1: float = 0.0
    s2: float = 0.0
    n: float = 0.0

    def add(self, pred_BLP: torch.Tensor, target_BLP: torch.Tensor, mask_BL: torch.Tensor) -> None:
        m = mask_BL.bool()
        pred, target = pred_BLP[m].double(), target_BLP[m].double()
        self.sse += float(((pred - target) ** 2).sum())
        self.s1 += float(target.sum())
        self.s2 += float((target**2).sum())
        self.n += float(target.numel())

    def tensor(self) -> torch.Tensor:
        return torch.tensor([self.sse, self.s1, self.s2, self.n], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> R2Sums:
        return cls(*(float(v) for v in t))

    @property
    def r2(self) -> float:
        return float(pooled_r2(self.sse, self.s1, self.s2, self.n))

    @property
    def mse(self) -> float:
        return self.sse / max(self.n, 1.0)


@dataclass
class WindowSums:
    """Per evaluation window: the target's sums over its masked values ([W, 3]: s1, s2, n) and each method's squared
    error ({method: [W]}). Any subset or resample of windows gives its pooled R^2 from these."""

    target: np.ndarray
    sse: dict[str, np.ndarray]
    higher_is_better = True

    def __len__(self) -> int:
        return len(self.target)

    def score(self, method: str, weights_W: np.ndarray | None = None) -> np.ndarray:
        """What ``brainlm.protocol.intervals.compare`` compares: the pooled R^2."""
        return self.r2(method, weights_W)

    @classmethod
    def of(cls, preds: dict[str, np.ndarray], x_BRT: np.ndarray, tmask_BRT: np.ndarray) -> WindowSums:
        m = tmask_BRT.reshape(len(x_BRT), -1)
        x = x_BRT.reshape(len(x_BRT), -1).astype(np.float64)
        target = np.stack([(x * m).sum(1), (x**2 * m).sum(1), m.sum(1)], axis=1).astype(np.float64)
        sse = {k: (((p.reshape(len(x), -1) - x) ** 2) * m).sum(1) for k, p in preds.items()}
        return cls(target, sse)

    def r2(self, method: str, weights_W: np.ndarray | None = None) -> np.ndarray:
        """Pooled R^2 of ``method`` over the windows, each counted ``weights_W`` times ([W] or [resamples, W])."""
        w = np.ones(len(self.target)) if weights_W is None else np.asarray(weights_W, dtype=np.float64)
        s1, s2, n = (w @ self.target).T
        return pooled_r2(w @ self.sse[method], s1, s2, n)

    def subset(self, rows: np.ndarray) -> WindowSums:
        return WindowSums(self.target[rows], {k: v[rows] for k, v in self.sse.items()})

    @classmethod
    def concat(cls, parts: list[WindowSums]) -> WindowSums:
        methods = [k for k in parts[0].sse if all(k in p.sse for p in parts)]
        return cls(
            np.concatenate([p.target for p in parts]), {k: np.concatenate([p.sse[k] for p in parts]) for k in methods}
        )

    def to_json(self) -> dict:
        return {"target": self.target.tolist(), "sse": {k: v.tolist() for k, v in self.sse.items()}}

    @classmethod
    def from_json(cls, d: dict) -> WindowSums:
        return cls(np.asarray(d["target"], dtype=np.float64), {k: np.asarray(v) for k, v in d["sse"].items()})


def r2_parts(pred: np.ndarray, x: np.ndarray, tmask: np.ndarray) -> tuple[float, np.ndarray]:
    """Pooled R^2 over masked values, and R^2 per parcel (NaN where a parcel has fewer than 2 masked values)."""
    x = np.asarray(x, dtype=np.float64)
    err = np.where(tmask, (pred - x) ** 2, 0.0)
    xm = np.where(tmask, x, 0.0)
    sse_R, s1_R, s2_R = err.sum(axis=(0, 2)), xm.sum(axis=(0, 2)), (xm**2).sum(axis=(0, 2))
    n_R = tmask.sum(axis=(0, 2))
    pooled = pooled_r2(sse_R.sum(), s1_R.sum(), s2_R.sum(), n_R.sum())
    per = np.where(n_R > 1, pooled_r2(sse_R, s1_R, s2_R, n_R), np.nan)
    return float(pooled), per


@dataclass
class UnitScores:
    """Per evaluated unit (a recording, a window): each method's loss or score ({method: [U]}), e.g. a recording's
    squared error or whether its class was right; a set of units scores their mean."""

    values: dict[str, np.ndarray]
    higher_is_better: bool

    def __len__(self) -> int:
        return len(next(iter(self.values.values())))

    def score(self, method: str, weights_U: np.ndarray | None = None) -> np.ndarray:
        v = np.asarray(self.values[method], dtype=np.float64)
        if weights_U is None:
            return np.float64(v.mean())
        w = np.asarray(weights_U, dtype=np.float64)
        return (w @ v) / w.sum(axis=-1)

    def subset(self, rows: np.ndarray) -> UnitScores:
        return UnitScores({k: np.asarray(v)[rows] for k, v in self.values.items()}, self.higher_is_better)
