"""Subject folds: K-fold cross-validation over subjects, every subject a test subject exactly once.

The subjects (sorted, then permuted by ``seed``) are cut into K contiguous groups; fold k tests group k, validates
on the first ``val_subjects`` subjects of the groups after it (wrapping around), and trains on the rest. A fold's
test subjects are never in its training or validation set, and its validation subjects never in its training set:
whatever is chosen on validation (an epoch, a setting, a baseline's strength) is chosen without the test subjects.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainlm.exceptions import InputError


@dataclass(frozen=True)
class Fold:
    index: int
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]

    def split_of(self) -> dict[str, str]:
        """subject -> train | val | test."""
        return {
            **{s: "train" for s in self.train},
            **{s: "val" for s in self.val},
            **{s: "test" for s in self.test},
        }

    def write_splits(self, path: str | Path) -> Path:
        """The fold as a ``--splits`` file for ``python -m data_prep build`` (subject, split)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = sorted(self.split_of().items())
        path.write_text("subject\tsplit\n" + "".join(f"{s}\t{v}\n" for s, v in rows))
        return path


def subject_folds(subjects: list[str], k: int, val_subjects: int = 1, seed: int = 0) -> list[Fold]:
    """K folds over ``subjects`` (see the module docstring). ``k`` = the number of subjects: leave one out."""
    subjects = sorted(set(subjects))
    n = len(subjects)
    if k < 2:
        raise InputError(f"--folds must be at least 2 (every subject a test subject once), got {k}")
    if val_subjects < 0:
        raise InputError(f"--val-subjects must be at least 0, got {val_subjects}")
    if k > n:
        raise InputError(f"--folds {k}: only {n} subjects; use at most {n} folds (leave-one-subject-out)")
    order = [subjects[i] for i in np.random.default_rng(seed).permutation(n)]
    groups = [list(g) for g in np.array_split(np.array(order, dtype=object), k)]
    largest = max(len(g) for g in groups)
    if n - largest - val_subjects < 1:
        raise InputError(
            f"--folds {k} with --val-subjects {val_subjects} on {n} subjects leaves no training subject in a fold "
            f"(test {largest}, val {val_subjects}); use fewer folds or validation subjects"
        )
    folds = []
    for i, test in enumerate(groups):
        rest = [s for g in groups[i + 1 :] + groups[:i] for s in g]
        val = rest[:val_subjects]
        train = sorted(set(subjects) - set(test) - set(val))
        folds.append(Fold(i, tuple(sorted(train)), tuple(sorted(val)), tuple(sorted(test))))
    return folds
