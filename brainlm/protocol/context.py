"""Recording context: for each evaluation window, the other windows of the same recording it may be given.

A window's context is the other windows of its recording that do not overlap it (|start - start'| >= the window
length), nearest in time first (ties: the earlier first), the ``k`` nearest or all of them (``k`` None). Context
windows are visible input, never targets, and are drawn from the same split as the window: a test window's context
is the rest of its own (test) recording. Deterministic: the same windows get the same context in every run.
"""

from __future__ import annotations

from brainlm.model.context import context_statistics, context_windows

__all__ = ["context_label", "context_statistics", "context_windows", "parse_context"]

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
