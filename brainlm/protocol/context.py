"""Recording context: for each evaluation window, the other windows of the same recording it may be given.

A window's context is the other windows of its recording that do not overlap it (|start - start'| >= the window
length), nearest in time first (ties: the earlier first), the ``k`` nearest or all of them (``k`` None). Context
windows are visible input, never targets, and are drawn from the same split as the window: a test window's context
is the rest of its own (test) recording. Deterministic: the same windows get the same context in every run.
"""

from __future__ import annotations

from collections.abc import Sequence

CONTEXTS_HELP = "0 (none), K (the K nearest other windows of the recording) or all"


def parse_context(value: str | int | None) -> int | None:
    """``"all"`` -> None (every other window), ``"0"`` / ``"4"`` -> 0 / 4."""
    from brainlm.exceptions import InputError

    if value is None or str(value).strip().lower() == "all":
        return None
    try:
        k = int(value)
    except ValueError:
        raise InputError(f"--context {value!r}: expected {CONTEXTS_HELP}") from None
    if k < 0:
        raise InputError(f"--context {value!r}: expected {CONTEXTS_HELP}")
    return k


def context_label(k: int | None) -> str:
    return "all" if k is None else str(k)


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
    import numpy as np

    B, R = windows_BRT.shape[:2]
    cov_BRR, n_B = np.zeros((B, R, R)), np.zeros(B, dtype=np.int64)
    for b, others in enumerate(context):
        if others:
            flat_RX = np.concatenate([windows_BRT[j] for j in others], axis=1).astype(np.float64)
            cov_BRR[b], n_B[b] = np.cov(flat_RX), flat_RX.shape[1]
    return cov_BRR, n_B
