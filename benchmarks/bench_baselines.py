"""Benchmark the spatio-temporal reconstruction baseline against the dense solve it replaced, side by side in one run.

(The ridge / adaptive part of this benchmark, loops beside the decoder prior's batched solve, is gone: since
2026-12-06 both are one implementation, `brainlm.model.prior.impute`; `benchmarks/bench_reconstruct.py` times the
whole `brainlm reconstruct` against the commit before it.)

`GaussianImputer.spatiotemporal` (brainlm/eval/baselines.py) conditions each masked parcel's patch on the visible
parcels at the same timepoints and on the parcel's own visible neighbouring patches. Until 2026-12-04 it built
the whole joint system, one dense (V + s) x (V + s) matrix per masked parcel and timepoint, and solved each one.
At 300 parcels that took minutes per window. Today it solves the V x V block once per token column and a small
s x s Schur complement per (parcel, timepoint). `dense_spatiotemporal` below is the replaced code, kept here as
the reference. Both run on the same windows and masks in one run. Reported: seconds per window for each, their
ratio, and the largest absolute difference of the predictions.

Data: a stationary Gaussian process with a low-rank spatial structure (8 AR(1) sources mixed into R parcels,
plus AR(1) noise per parcel), T = 200, patches of 20, the statistics fitted on 64 training windows. Masks: the
evaluation protocol's (`fixed_masks`) with random and parcel masking.

    python -m benchmarks.bench_baselines --out bench-results/baselines.json [--parcels 94 300] [--windows 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import CpuMonitor, command_line, machine, now_utc, write_json
from brainlm.eval.baselines import REACH, GaussianImputer, patch_groups
from brainlm.protocol import fixed_masks, r2_parts, time_mask

T, P = 200, 20


def windows(B: int, R: int, seed: int) -> np.ndarray:
    """[B, R, T]: 8 AR(1) sources (rho 0.9) mixed into R parcels, plus AR(1) noise (rho 0.7) of variance ~1."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(1234).normal(size=(R, 8)) / np.sqrt(8)
    src, noise = np.zeros((B, 8)), np.zeros((B, R))
    out = np.empty((B, R, T))
    for t in range(T + 50):
        src = 0.9 * src + rng.normal(size=(B, 8)) * np.sqrt(1 - 0.81)
        noise = 0.7 * noise + rng.normal(size=(B, R)) * np.sqrt(1 - 0.49)
        if t >= 50:
            out[:, :, t - 50] = src @ mix.T + noise
    return out


def dense_spatiotemporal(g: GaussianImputer, x_BRT: np.ndarray, tmask_BRT: np.ndarray, lam: float) -> np.ndarray:
    """The replaced implementation: the joint system over [x_V(t), x_r(S)], dense, for every parcel and timepoint."""
    x = x_BRT.astype(np.float64)
    out = x.copy()
    for b, n, masked, vis, groups in patch_groups(tmask_BRT[:, :, ::P], P):
        for rows, S in groups:
            out[b, masked[rows], n * P : (n + 1) * P] = dense_condition(g, x[b], masked[rows], vis, S, n * P, lam)
    return out


def dense_condition(
    g: GaussianImputer, x_RT: np.ndarray, group: np.ndarray, vis: np.ndarray, S: np.ndarray, t0: int, lam: float
) -> np.ndarray:
    G, V, s = len(group), len(vis), len(S)
    if V == 0 and s == 0:
        return np.repeat(g.mu_R[group, None], P, axis=1)
    t_P = np.arange(t0, t0 + P)
    mu, full, off = g.mu_R, g.full, g.offset
    out = np.empty((G, P))
    F = V + s
    chunk = max(1, int(256 * 2**20 // (8 * P * F * (F + 1))))
    for lo in range(0, G, chunk):
        rs = group[lo : lo + chunk]
        k = len(rs)
        A = np.zeros((k, P, F, F))
        y = np.zeros((k, P, F))
        f = np.zeros((k, P, F))
        if V:
            A[:, :, :V, :V] = g.cov_RR[np.ix_(vis, vis)]
            y[:, :, :V] = g.cov_RR[np.ix_(vis, rs)].T[:, None, :]
            f[:, :, :V] = (x_RT[vis][:, t_P] - mu[vis, None]).T[None]
        if s:
            lag_PS = S[None, :] - t_P[:, None] + off
            vr = full[:, vis][:, :, rs]
            A_gPVS = vr[lag_PS].transpose(3, 0, 2, 1)
            if V:
                A[:, :, :V, V:] = A_gPVS
                A[:, :, V:, :V] = A_gPVS.transpose(0, 1, 3, 2)
            diag = full[:, rs, rs]
            A[:, :, V:, V:] = diag[S[None, :] - S[:, None] + off].transpose(2, 0, 1)[:, None]
            y[:, :, V:] = diag[t_P[:, None] - S[None, :] + off].transpose(2, 0, 1)
            f[:, :, V:] = (x_RT[rs][:, S] - mu[rs, None])[:, None, :]
        A += lam * g.scale * np.eye(F)
        w = np.linalg.solve(A, y[..., None])[..., 0]
        out[lo : lo + k] = mu[rs, None] + (w * f).sum(-1)
    return out


def measure(R: int, masking: str, ratio: float, B: int, lam: float) -> dict[str, Any]:
    g = GaussianImputer(windows(64, R, seed=0), max_lag=(2 * REACH + 1) * P)
    x = windows(B, R, seed=1)
    tmask = time_mask(fixed_masks(B, R, T // P, ratio, masking), R, T // P, P)
    row: dict[str, Any] = {"parcels": R, "masking": masking, "mask_ratio": ratio, "windows": B, "lam": lam}
    preds = {}
    for name, run in (
        ("blocked", lambda: g.spatiotemporal(x, tmask, P, lam)),
        ("dense", lambda: dense_spatiotemporal(g, x, tmask, lam)),
    ):
        with CpuMonitor() as mon:
            preds[name] = run()
        row[name] = {**mon.record(), "s_per_window": round(mon.wall / B, 4)}
    row["speedup"] = round(row["dense"]["wall_s"] / row["blocked"]["wall_s"], 2)
    row["max_abs_diff"] = float(np.abs(preds["blocked"] - preds["dense"]).max())
    row["masked_r2"] = r2_parts(preds["blocked"], x, tmask)[0]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parcels", type=int, nargs="+", default=[94, 300])
    parser.add_argument("--windows", type=int, default=2, help="evaluation windows per setting (the dense one is slow)")
    parser.add_argument("--lam", type=float, default=0.01)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for R in args.parcels:
        for masking, ratio in (("random", 0.5), ("parcel", 0.5), ("random", 0.75)):
            t0 = time.perf_counter()
            row = measure(R, masking, ratio, args.windows, args.lam)
            rows.append(row)
            print(
                f"R={R:4d} {masking:6s} {ratio:.2f}: blocked {row['blocked']['s_per_window']:.3f} s/window, "
                f"dense {row['dense']['s_per_window']:.3f} s/window, x{row['speedup']:.1f}, "
                f"max |diff| {row['max_abs_diff']:.1e}, foreign CPU {row['dense']['foreign_cpu_share']:.0%} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    write_json(
        Path(args.out) if args.out else None,
        {"command": command_line(), "date": now_utc(), "machine": machine(), "rows": rows},
    )


if __name__ == "__main__":
    main()
