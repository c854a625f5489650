"""A window's recording context, as numbers: which other windows of its recording it may be given (never one that
overlaps it, nearest first) and their covariance. The evaluation protocol's rule (``brainlm.protocol.context``) and
the Gaussian prior's input; numpy only, so the model layer and the analyses share one definition."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def context_windows(recordings: Sequence[str], starts: Sequence[int], window: int, k: int | None) -> list[list[int]]:
    """For window i: the indices of its context windows (same recording, not overlapping it), nearest first."""
    by_recording: dict[str, list[int]] = {}
    for i, rec in enumerate(recordings):
        by_recording.setdefault(rec, []).append(i)
    out = []
    for i, rec in enumerate(recordings):
        if k == 0:
            out.append([])
            continue
        others = [j for j in by_recording[rec] if j != i and abs(starts[j] - starts[i]) >= window]
        others.sort(key=lambda j: (abs(starts[j] - starts[i]), starts[j]))
        out.append(others if k is None else others[:k])
    return out


def context_statistics(windows_BRT, context: list[list[int]]):
    """Each window's recording context as (covariance [B, R, R], timepoints [B]): the covariance of its context
    windows' timepoints together (zeros and 0 where it has none). numpy in, numpy out."""
    B, R = windows_BRT.shape[:2]
    cov_BRR, n_B = np.zeros((B, R, R)), np.zeros(B, dtype=np.int64)
    for b, others in enumerate(context):
        if others:
            flat_RX = np.concatenate([windows_BRT[j] for j in others], axis=1).astype(np.float64)
            cov_BRR[b], n_B[b] = np.cov(flat_RX), flat_RX.shape[1]
    return cov_BRR, n_B
