"""Where the information to reconstruct a held-out real window lies: the ridge imputation (the visible parcels at
the same timepoints) under three covariances, on the evaluation protocol of ``brainlm reconstruct``.

    python scripts/real_ceiling.py --shards real/shards [--out real-results/ceiling.json]

- ``k training subjects``: the covariance of k of the training subjects' windows (the mean over every choice of
  k), for k = 1 .. all: how the population prior improves with more subjects.
- ``own subject``: each test window's covariance from its own subject's *other* windows (not the window itself):
  what knowing the subject's connectivity is worth, information a single window does not hold.
- ``own subject, k nearest windows``: the covariance of the k other windows of the subject nearest in time, shrunk
  toward the training covariance (the weight chosen on the validation subject the same way): how much context
  beyond the window it takes to gain what.
The ridge strength is chosen on the validation windows with the training covariance, as ``reconstruct`` does.
No model is involved; see docs/results-real.md for the figures and what they say.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

from brainlm.data.loader import fixed_samples
from brainlm.data.shardset import ShardSet
from brainlm.eval.baselines import ALPHAS, Baselines, GaussianImputer
from brainlm.model import prior
from brainlm.protocol import fixed_masks, r2_parts, time_mask

# The windows reconstruct's baselines see: at most prior.FIT_WINDOWS training windows, 64 validation windows.
LIMITS = {"train": prior.FIT_WINDOWS, "val": 64, "test": None}


def windows(shard_set: ShardSet, split: str, T: int) -> tuple[np.ndarray, np.ndarray]:
    n = shard_set.manifest.num_samples(split)
    x, meta = fixed_samples(shard_set, split, min(n, LIMITS[split] or n), T)
    return x.numpy().astype(np.float64), np.array([m["subject"] for m in meta])


def own_subject(
    x: np.ndarray,
    subject: np.ndarray,
    tmask: np.ndarray,
    P: int,
    lam: float,
    k: int | None,
    alpha: float,
    population: GaussianImputer,
) -> float:
    """Ridge R^2 with each window's covariance from other windows of its subject: the ``k`` nearest in time (all
    when None), shrunk toward ``population`` by weight 1 - ``alpha``."""
    pred = np.empty_like(x)
    for b in range(len(x)):
        others = np.flatnonzero((subject == subject[b]) & (np.arange(len(x)) != b))
        others = others[np.argsort(np.abs(others - b), kind="stable")][:k]
        g = GaussianImputer(x[others], max_lag=1)
        if alpha < 1:  # the spatial imputation reads mu_R, cov_RR and scale only
            g.mu_R, g.cov_RR = population.mu_R, (1 - alpha) * population.cov_RR + alpha * g.cov_RR
            g.scale = float(np.trace(g.cov_RR)) / len(g.cov_RR)
        pred[b] = g.spatial(x[b : b + 1], tmask[b : b + 1], P, lam)[0]
    return r2_parts(pred, x, tmask)[0]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", required=True, help="shards built by data_prep build (train / val / test splits)")
    ap.add_argument("--timepoints", type=int, default=100, help="window length (the model's num_timepoints)")
    ap.add_argument("--patch-size", type=int, default=20)
    ap.add_argument("--mask-ratio", type=float, default=0.5)
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    T, P = args.timepoints, args.patch_size
    shard_set = ShardSet.open(args.shards)
    (train, train_s), (val, val_s), (test, test_s) = (windows(shard_set, s, T) for s in ("train", "val", "test"))
    R, N = test.shape[1], T // P
    subjects = sorted(set(train_s))
    result: dict = {"windows": {"train": len(train), "val": len(val), "test": len(test)}, "subjects": len(subjects)}
    # reconstruct's own baselines, so the ridge strength is chosen on validation exactly as there.
    baselines = Baselines(train.mean(axis=(0, 2)), GaussianImputer(train, max_lag=1), val, args.mask_ratio, {})
    for masking in ("random", "parcel"):
        tmask = time_mask(fixed_masks(len(test), R, N, args.mask_ratio, masking), R, N, P)
        lam = baselines.settings_of("ridge", masking, P)["lam"]
        row: dict = {"lam": lam, "k_training_subjects": {}}
        for k in range(1, len(subjects) + 1):
            scores = [
                r2_parts(GaussianImputer(train[np.isin(train_s, c)], 1).spatial(test, tmask, P, lam), test, tmask)[0]
                for c in itertools.combinations(subjects, k)
            ]
            row["k_training_subjects"][k] = float(np.mean(scores))
        row["own_subject"] = own_subject(test, test_s, tmask, P, lam, None, 1.0, baselines.gaussian)
        tmask_val = time_mask(fixed_masks(len(val), R, N, args.mask_ratio, masking), R, N, P)
        row["own_subject_nearest"] = {}
        for k in (1, 2, 4):
            alpha = max(ALPHAS, key=lambda a: own_subject(val, val_s, tmask_val, P, lam, k, a, baselines.gaussian))
            r2 = own_subject(test, test_s, tmask, P, lam, k, alpha, baselines.gaussian)
            row["own_subject_nearest"][k] = {"r2": r2, "alpha": alpha}
        result[masking] = row
        curve = "  ".join(f"k={k} {v:.3f}" for k, v in row["k_training_subjects"].items())
        near = "  ".join(f"{k} {v['r2']:.3f} (alpha {v['alpha']})" for k, v in row["own_subject_nearest"].items())
        print(f"{masking:7s} ridge with {curve}  |  own subject's other windows {row['own_subject']:.3f}  (lam {lam})")
        print(f"{'':7s} own subject's nearest windows, shrunk: {near}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
