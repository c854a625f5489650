"""Per-parcel robust scaling ``(x - median) / IQR``, fitted on training subjects only.

Each recording is first normalised on its own (``normalize``): ``demean`` removes each parcel's temporal
median (default: safe for raw intensities and for already-normalised arrays alike), ``psc`` converts to
percent signal change around that median (for raw BOLD intensities, whose scale differs across scanners
and subjects), ``none`` leaves it. Then the per-parcel median and IQR of the training recordings scale
every recording the same way.

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
NORMALIZE = ("demean", "psc", "none")


def non_finite(signal_RT: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mask of NaN / inf values [R, T] and the parcels holding any: the check before any scaling, shared by
    the recordings QC (``brainlm.recordings.qc``) and inference on a recording (``brainlm.model.inference``)."""
    bad = ~np.isfinite(signal_RT)
    return bad, np.flatnonzero(bad.any(axis=1))


def normalize_recording(signal_RT: np.ndarray, mode: str, path: str = "recording") -> np.ndarray:
    """Per-recording normalisation, before the cohort-level robust scaling."""
    if mode == "none":
        return signal_RT
    median_R1 = np.median(signal_RT, axis=1, keepdims=True)
    if mode == "demean":
        return signal_RT - median_R1
    if mode == "psc":
        if (median_R1 <= 0).any():
            raise ShardError(
                f"{path}: percent signal change needs positive baselines, but some parcels have a median "
                "<= 0 (the data look already normalised); use --normalize demean"
            )
        return 100.0 * (signal_RT - median_R1) / median_R1
    raise ShardError(f"normalize must be one of {', '.join(NORMALIZE)}, got {mode!r}")


@dataclass
class RobustScaler:
    center: np.ndarray  # [R] per-parcel median
    scale: np.ndarray  # [R] per-parcel interquartile range
    normalize: str = "demean"
    n_recordings: int = 0
    n_timepoints: int = 0

    @classmethod
    def fit(
        cls, recordings: Iterable[np.ndarray], normalize: str = "demean", max_timepoints: int = 200_000
    ) -> RobustScaler:
        """Fit on ``[R, T]`` recordings (the training split's).

        Exact when all recordings together have at most ``max_timepoints`` timepoints; beyond that each
        recording contributes an evenly spaced subsample of its timepoints, so memory stays bounded
        (R x max_timepoints float32) whatever the cohort size.
        """
        recordings = [normalize_recording(r, normalize) for r in recordings]
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
        return cls(median.astype(np.float32), iqr.astype(np.float32), normalize, len(recordings), data.shape[1])

    def transform(self, signal_RT: np.ndarray) -> np.ndarray:
        """A whole recording ``[R, T]`` -> normalised, robust-scaled float32 (crop after this)."""
        signal_RT = normalize_recording(signal_RT, self.normalize)
        return ((signal_RT - self.center[:, None]) / self.scale[:, None]).astype(np.float32)

    def to_dict(self) -> dict:
        return {
            "method": "robust",
            "formula": "(x - median) / iqr",
            "normalize": self.normalize,
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
                d.get("normalize", "none"),
                int(d.get("n_recordings", 0)),
                int(d.get("n_timepoints", 0)),
            )
        except KeyError as err:
            raise ShardError(f"scaling statistics lack {err}; expected 'center' and 'scale' lists") from None
