"""Progress on long work: a bar in a terminal; where the output is not one (CI, `make demo > log`, a Kubernetes
pod's log) the bar is drawn once when it starts and once when it ends, never hundreds of carriage-return lines, and
the inner bars of a stage (``inner=True``) are not drawn at all."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm


def bar(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    enabled: bool = True,
    inner: bool = False,
    **kwargs: Any,
) -> tqdm:
    """A tqdm bar on stderr following the rules above."""
    terminal = sys.stderr.isatty()
    disable = not enabled or (inner and not terminal)
    if not terminal:
        kwargs |= {"mininterval": float("inf"), "leave": True}
    elif inner:
        kwargs.setdefault("leave", False)
    return tqdm(
        iterable, total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr, dynamic_ncols=True, **kwargs
    )
