"""Quality checks on a parcellated recording. Each failure names the file and what was expected."""

from __future__ import annotations

import math

import numpy as np

from brainlm.exceptions import EmptyRecordingError, TRMismatchError
from brainlm.model.scaling import non_finite

# A parcel whose standard deviation is below this fraction of the recording's median parcel std is flat.
FLAT_FRACTION = 1e-6


def check_signal(signal_RT: np.ndarray, labels: list[str], path: str) -> None:
    """Non-finite values and flat parcels."""
    bad, rows = non_finite(signal_RT)
    if len(rows):
        raise EmptyRecordingError(
            f"{path}: {int(bad.sum())} non-finite value(s) in {len(rows)} parcel(s) "
            f"(e.g. {', '.join(labels[i] for i in rows[:3])}); expected finite signals"
        )
    std = signal_RT.std(axis=1)
    ref = float(np.median(std)) if std.size else 0.0
    flat = np.flatnonzero(std <= max(ref * FLAT_FRACTION, 1e-12))
    if len(flat):
        raise EmptyRecordingError(
            f"{path}: {len(flat)} flat parcel(s) with no variance over time "
            f"(e.g. {', '.join(labels[i] for i in flat[:3])}); the atlas may not overlap the image there"
        )


def check_length(num_timepoints: int, crop: int, path: str, scrubbed: int = 0) -> None:
    if num_timepoints < crop:
        why = f" after {scrubbed} high-motion frames were scrubbed (--denoise)" if scrubbed else ""
        raise EmptyRecordingError(
            f"{path}: {num_timepoints} timepoints{why}, fewer than one crop of {crop}; lower --crop or drop the file"
        )


def check_tr(tr: float | None, target_tr: float | None, path: str, resample: bool) -> None:
    if tr is None:
        raise TRMismatchError(
            f"{path}: no TR found (recordings.tsv column 'tr', BIDS sidecar RepetitionTime or NIfTI header); "
            "pass --tr SECONDS"
        )
    if not math.isfinite(tr) or tr <= 0:
        raise TRMismatchError(
            f"{path}: its TR is {tr!r}, not a positive number of seconds; fix the recordings.tsv 'tr' column, the "
            "sidecar's RepetitionTime or the header (or pass --tr SECONDS)"
        )
    if target_tr is not None and not resample and abs(tr - target_tr) > 1e-3:
        raise TRMismatchError(
            f"{path}: TR {tr:g} s differs from the build's TR {target_tr:g} s; pass --resample to resample "
            "to --tr, or build the two TRs separately"
        )
