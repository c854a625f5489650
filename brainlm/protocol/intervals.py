"""Paired bootstrap intervals for a margin between two methods evaluated on the same windows (or recordings).

The margin is how much better ``a`` scores than ``b`` on the test units: pooled R^2(a) - pooled R^2(b) over
windows (``WindowSums``), or the difference of a mean loss or score over recordings (``UnitScores``: for a loss
such as the squared error, b's minus a's, so a positive margin always means a is better). Its 95% interval is
drawn twice, both times paired (one resample scores both methods, so what the units share cancels):
- over windows: the windows resampled with replacement (how much the figure depends on which windows were drawn);
- over subjects: the subjects resampled as units, each bringing all of its windows (how much it depends on which
  people were tested: the interval that says whether a result holds for another person). Undefined with fewer
  than two test subjects.
A winner is named only when every defined interval excludes 0; otherwise the verdict is "tie".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from brainlm.protocol.r2 import UnitScores, WindowSums

Scores = WindowSums | UnitScores

RESAMPLES = 2000
SEED = 0
LEVEL = 0.95


@dataclass
class Comparison:
    a: str
    b: str
    margin: float
    windows: tuple[float, float]
    subjects: tuple[float, float] | None
    per_subject: dict[str, float] = field(default_factory=dict)

    @property
    def winner(self) -> str:
        return verdict(self.a, self.b, [self.windows, self.subjects])

    def to_json(self) -> dict:
        return {
            "a": self.a,
            "b": self.b,
            "margin": self.margin,
            "interval_windows": list(self.windows),
            "interval_subjects": list(self.subjects) if self.subjects else None,
            "per_subject": self.per_subject,
            "winner": self.winner,
        }


def verdict(a: str, b: str, intervals: list[tuple[float, float] | None]) -> str:
    """``a`` when every defined interval of (a - b) is above 0, ``b`` when every one is below, else "tie"."""
    defined = [iv for iv in intervals if iv is not None]
    if defined and all(lo > 0 for lo, _ in defined):
        return a
    if defined and all(hi < 0 for _, hi in defined):
        return b
    return "tie"


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    lo, hi = np.nanpercentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def compare(
    sums: Scores,
    subjects_W: list[str] | np.ndarray,
    a: str,
    b: str,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
) -> Comparison:
    """How much better ``a`` scores than ``b``, with its paired bootstrap intervals over units (windows or
    recordings) and over subjects, and per subject."""
    subjects_W = np.asarray(subjects_W, dtype=object)
    W = len(sums)
    if len(subjects_W) != W:
        raise ValueError(f"{len(subjects_W)} subject labels for {W} units")
    sign = 1.0 if sums.higher_is_better else -1.0

    def diff(scores: Scores, weights=None):
        return sign * (scores.score(a, weights) - scores.score(b, weights))

    rng = np.random.default_rng(seed)
    windows = _interval(diff(sums, rng.multinomial(W, np.full(W, 1.0 / W), size=resamples)), level)
    names, index_W = np.unique(subjects_W.astype(str), return_inverse=True)
    per_subject = {str(name): float(diff(sums.subset(index_W == i))) for i, name in enumerate(names)}
    subject_iv = None
    if len(names) >= 2:
        s_BS = rng.multinomial(len(names), np.full(len(names), 1.0 / len(names)), size=resamples)
        subject_iv = _interval(diff(sums, s_BS[:, index_W]), level)
    return Comparison(a, b, float(diff(sums)), windows, subject_iv, per_subject)


def best(sums: Scores, methods: list[str]) -> str:
    """The method that scores best over all units (the bar: the strongest baseline)."""
    sign = 1.0 if sums.higher_is_better else -1.0
    return max(methods, key=lambda m: sign * float(sums.score(m)))
