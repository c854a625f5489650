"""Per-parcel robust scaling ``(x - median) / IQR``, fitted on training subjects only.

The reference implementation computed ``x - median / IQR`` (operator precedence: it never divided by the
IQR) from statistics that included its test files, and never released them. Here the statistics are
fitted on the training split, stored in the manifest, and carried with every exported model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from brainlm.exceptions import ShardError

# Below this IQR a parcel is treated as constant and only centred: dividing by ~0 would blow it up.
MIN_IQR = 1e-8


@dataclass
class RobustScaler:
    center: np.ndarray  # [R] per-parcel median
    scale: np.ndarray  # [R] per-parcel interquartile range
    n_recordings: int = 0
    n_timepoints: int = 0

    @classmethod
    def fit(cls, recordings: Iterable[np.ndarray], max_timepoints: int = 200_000) -> RobustScaler:
        """Fit on ``[R, T]`` recordings (the training split's).

        Exact when all recordings together have at most ``max_timepoints`` timepoints; beyond that each
        recording contributes an evenly spaced subsample of its timepoints, so memory stays bounded
        (R x max_timepoints float32) whatever the cohort size.
        """
        recordings = list(recordings)
        if not recordings:
            raise ShardError("cannot fit the robust scaler: the training split has no usable recording")
        total = sum(r.shape[1] for r in recordings)
        per_rec = max(1, max_timepoints // len(recordings)) if total > max_timepoints else None
        columns = []
        for r in recordings:
            if per_rec is not None and r.shape[1] > per_rec:
                idx = np.linspace(0, r.shape[1] - 1, per_rec).round().astype(int)
                r = r[:, idx]
            columns.append(np.asarray(r, dtype=np.float64))
        data = np.concatenate(columns, axis=1)
        q25, median, q75 = np.percentile(data, [25, 50, 75], axis=1)
        iqr = q75 - q25
        iqr = np.where(iqr < MIN_IQR, 1.0, iqr)
        return cls(median.astype(np.float32), iqr.astype(np.float32), len(recordings), data.shape[1])

    def transform(self, signal_RT: np.ndarray) -> np.ndarray:
        return ((signal_RT - self.center[:, None]) / self.scale[:, None]).astype(np.float32)

    def inverse_transform(self, scaled_RT: np.ndarray) -> np.ndarray:
        return (scaled_RT * self.scale[:, None] + self.center[:, None]).astype(np.float32)

    def to_dict(self) -> dict:
        return {
            "method": "robust",
            "formula": "(x - median) / iqr",
            "fitted_on": "train",
            "center": [float(v) for v in self.center],
            "scale": [float(v) for v in self.scale],
            "n_recordings": self.n_recordings,
            "n_timepoints": self.n_timepoints,
        }

    @classmethod
    def from_dict(cls, d: dict) -> RobustScaler:
        try:
            return cls(
                np.asarray(d["center"], dtype=np.float32),
                np.asarray(d["scale"], dtype=np.float32),
                int(d.get("n_recordings", 0)),
                int(d.get("n_timepoints", 0)),
            )
        except KeyError as err:
            raise ShardError(f"scaling statistics lack {err}; expected 'center' and 'scale' lists") from None
