"""Model-free reconstruction baselines: what a masked autoencoder must beat.

Every baseline sees the same visible values as the model and predicts the masked ones; the linear ones come from
one stationary Gaussian model of the training split's windows: per-parcel means mu and lagged covariances
C(tau)_ij = Cov(x_i(t), x_j(t + tau)). Shapes: B windows, R parcels, T timepoints, P per patch, N = T / P.

- zero            0 (the training median after robust scaling)
- mean            each parcel's training mean
- interp          linear interpolation in time between the parcel's visible timepoints (edges held)
- ridge           spatial imputation: each masked timepoint from the visible parcels at the same timepoint,
                  E[x_M(t) | x_V(t)] = mu_M + C_MV (C_VV + lam s I)^-1 (x_V(t) - mu_V)
- spatiotemporal  the visible parcels at the same timepoint *and* the parcel's own visible neighbouring patches
                  (the nearest visible patch before and after, up to REACH patches away): the same conditional
                  expectation over the joint vector [x_V(t), x_r(S)], whose covariance comes from the lagged C(tau)

- adaptive        the spatial imputation with each window's own covariance: C(0) shrunk toward the covariance
                  of the window itself (its visible values, the masked ones imputed), C_w = (1 - alpha) C(0) +
                  alpha cov(window), imputed again (two passes). A recording's connectivity differs from the
                  cohort's; this is the linear way to adapt to it in context, the thing a masked autoencoder can do
                  and a fixed covariance cannot.

lam (and alpha) are chosen on the validation split; s = trace(C(0)) / R makes lam scale-free. ``Baselines`` holds them
fitted, with the settings each linear one chose per masking strategy (``LINEAR``: the grids; the +ctx ones also see
the window's recording context, their covariance shrunk toward its other windows').
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from brainlm import progress, threads
from brainlm.model import prior
from brainlm.protocol import context_statistics, fixed_masks, r2_parts, time_mask

REACH = 2  # the spatio-temporal baseline looks this many patches away for a visible patch of the parcel
WINDOWS = 8  # windows per batched solve of the spatial and adaptive baselines (memory: ~8 x N x R^2 doubles)
GPU_WINDOWS = 64  # the same on a GPU, which parallelises within a batch (64 x 10 x 424^2 doubles: ~1 GB)


def interpolate(x_BRT: np.ndarray, tmask_BRT: np.ndarray, fallback_R: np.ndarray) -> np.ndarray:
    """Linear interpolation in time between each parcel's visible timepoints; a fully masked parcel gets
    ``fallback_R``."""
    out = x_BRT.astype(np.float64).copy()
    t = np.arange(x_BRT.shape[2])
    for b in range(x_BRT.shape[0]):
        for r in range(x_BRT.shape[1]):
            m = tmask_BRT[b, r]
            if not m.any():
                continue
            if m.all():
                out[b, r] = fallback_R[r]
            else:
                out[b, r, m] = np.interp(t[m], t[~m], x_BRT[b, r, ~m])
    return out


def patch_groups(tokens_BRN: np.ndarray, P: int):
    """For each window b and token column n with masked tokens: (b, n, masked parcels, visible parcels, groups).
    The masked parcels are grouped by the nearest visible patches of their own before and after n (up to REACH
    away); a group is (rows of ``masked``, the timepoints S of those patches), S empty where there are none."""
    B, _, N = tokens_BRN.shape
    for b in range(B):
        for n in range(N):
            masked = np.flatnonzero(tokens_BRN[b, :, n])
            if not len(masked):
                continue
            vis = np.flatnonzero(~tokens_BRN[b, :, n])
            before, after = np.zeros(len(masked), int), np.zeros(len(masked), int)
            for d in range(REACH, 0, -1):
                if n - d >= 0:
                    before[~tokens_BRN[b, masked, n - d]] = d
                if n + d < N:
                    after[~tokens_BRN[b, masked, n + d]] = d
            groups = []
            for db, da in sorted(set(zip(before.tolist(), after.tolist(), strict=True))):
                patches = ([n - db] if db else []) + ([n + da] if da else [])
                S = np.concatenate([np.arange(m * P, (m + 1) * P) for m in patches] or [np.zeros(0, int)])
                groups.append((np.flatnonzero((before == db) & (after == da)), S))
            yield b, n, masked, vis, groups


def lagged_products(xc_BRT: np.ndarray, lags: int, rows: int = 64) -> np.ndarray:
    """[lags, R, R]: sum over windows b and timepoints t of x_i(t) x_j(t + tau), for tau in [0, lags).

    Through the FFT: the cross-spectrum summed over windows is one complex matrix product per frequency, and its
    inverse transform gives every lag at once (zero-padded to T + lags, so nothing wraps around). At 300 parcels,
    100 lags and 192 windows this takes ~3 s where a product per lag took ~50 s; equal to 1e-14 relative
    (tests/test_baselines.py). ``rows`` parcels at a time bound the memory to ~rows x R x the FFT length."""
    _, R, T = xc_BRT.shape
    n = 1 << int(np.ceil(np.log2(T + lags)))
    F_KRB = np.fft.rfft(xc_BRT, n=n, axis=2).transpose(2, 1, 0).copy()
    out = np.empty((lags, R, R))
    for i in range(0, R, rows):
        cross_KrR = np.conj(F_KRB[:, i : i + rows]) @ F_KRB.transpose(0, 2, 1)
        out[:, i : i + rows] = np.fft.irfft(cross_KrR, n=n, axis=0)[:lags]
    return out


def chunks(n: int, size: int, workers: int = 1) -> list[slice]:
    """[0, n) in slices of at most ``size``, as equal as they can be, their count a multiple of ``workers`` where
    there are enough items (24 windows in 8s over 2 threads leave one thread idle a third of the time; in 6s none)."""
    count = -(-n // size)
    count = min(n, -(-count // workers) * workers) if n else 0
    edges = np.linspace(0, n, count + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in itertools.pairwise(edges)]


class GaussianImputer:
    """A stationary Gaussian model of windows [R, T], fitted on training windows: means and lagged covariances up to
    ``max_lag`` timepoints ((2 REACH + 1) patches: the farthest pair the spatio-temporal baseline conditions on)."""

    def __init__(self, train_BRT: np.ndarray, max_lag: int, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)  # where the batched imputations run (the spatio-temporal one: CPU)
        x = train_BRT.astype(np.float64)
        B, R, T = x.shape
        flat_RX = x.transpose(1, 0, 2).reshape(R, -1)
        self.mu_R = flat_RX.mean(axis=1)
        self.cov_RR = np.cov(flat_RX)
        self.scale = float(np.trace(self.cov_RR)) / R
        lags = min(max_lag, T)
        # lagged[tau][i, j] = Cov(x_i(t), x_j(t + tau)), pooled over every pair of timepoints tau apart.
        lagged = lagged_products(x - self.mu_R[None, :, None], lags)
        lagged /= np.maximum(B * (T - np.arange(lags)) - 1, 1)[:, None, None]
        lagged[0] = self.cov_RR
        # full_[lag + offset] for lag in (-lags, lags): negative lags are the transposes.
        self.offset = lags - 1
        self.full = np.concatenate([lagged[:0:-1].transpose(0, 2, 1), lagged]).astype(np.float32)

    # -- spatial ------------------------------------------------------------------------------------------

    def spatial(
        self, x_BRT: np.ndarray, tmask_BRT: np.ndarray, P: int, lam: float, cov_BRR: np.ndarray | None = None
    ) -> np.ndarray:
        """Each masked timepoint from the visible parcels at the same timepoint (the ``ridge`` baseline); with
        ``cov_BRR``, each window under its own covariance (e.g. the population's shrunk toward its recording's other
        windows)."""
        return self.adaptive(x_BRT, tmask_BRT, P, lam, 0.0, passes=0, cov_BRR=cov_BRR)

    def adaptive(
        self,
        x_BRT: np.ndarray,
        tmask_BRT: np.ndarray,
        P: int,
        lam: float,
        alpha: float,
        passes: int = 2,
        cov_BRR: np.ndarray | None = None,
        start_BRT: np.ndarray | None = None,
    ) -> np.ndarray:
        """The spatial imputation under each window's own shrunk covariance (the ``adaptive`` baseline); ``cov_BRR``
        replaces the population covariance per window; ``start_BRT``, the spatial imputation under the same
        ``lam`` and ``cov_BRR``, saves computing it again. One implementation with the model's decoder prior
        (``brainlm.model.prior.impute``, float64): batched over ``WINDOWS`` windows, one Cholesky solve per window
        and set of visible parcels, over those parcels only; on the CPU the batches run in torch's threads, on a GPU
        (``device``) one after the other, ``GPU_WINDOWS`` windows each."""
        dev = self.device
        mu, population = torch.from_numpy(self.mu_R).to(dev), torch.from_numpy(self.cov_RR).to(dev)

        def run(rows: slice) -> np.ndarray:
            def on(a: np.ndarray) -> torch.Tensor:
                return torch.from_numpy(np.ascontiguousarray(a)).to(dev)

            return (
                prior.impute(
                    on(np.asarray(x_BRT[rows], dtype=np.float64)),
                    on(tmask_BRT[rows, :, ::P]),
                    mu,
                    population if cov_BRR is None else on(cov_BRR[rows]),
                    P,
                    lam,
                    alpha,
                    passes,
                    scale=self.scale,
                    start_BRT=None if start_BRT is None else on(start_BRT[rows]),
                )
                .cpu()
                .numpy()
            )

        if dev.type != "cpu":
            return np.concatenate([run(rows) for rows in chunks(len(x_BRT), GPU_WINDOWS)])
        return np.concatenate(threads.map_kernels(run, chunks(len(x_BRT), WINDOWS, threads.kernel_workers())))

    # -- spatio-temporal -----------------------------------------------------------------------------------

    def spatiotemporal(self, x_BRT: np.ndarray, tmask_BRT: np.ndarray, P: int, lam: float) -> np.ndarray:
        """Each masked timepoint from the visible parcels at that timepoint and the parcel's own visible
        neighbouring patches (the ``spatiotemporal`` baseline)."""
        return self.spatiotemporal_grid(x_BRT, tmask_BRT, P, [lam])[0]

    def spatiotemporal_grid(
        self, x_BRT: np.ndarray, tmask_BRT: np.ndarray, P: int, lams: Sequence[float]
    ) -> list[np.ndarray]:
        """The spatio-temporal baseline under each of ``lams`` (a settings search): what does not depend on lam
        (the lagged covariance columns, the features) is gathered once per token column."""
        x = x_BRT.astype(np.float64)
        outs = [x.copy() for _ in lams]

        def run(b: int) -> None:
            for _, n, masked, vis, groups in patch_groups(tmask_BRT[b : b + 1, :, ::P], P):
                with_S = [(rows, S) for rows, S in groups if len(S)]  # the rest: the spatial part of _condition
                for out, pred in zip(outs, self._condition(x[b], masked, vis, with_S, n * P, P, lams), strict=True):
                    out[b, masked, n * P : (n + 1) * P] = pred

        threads.map_kernels(run, range(len(x)))
        return outs

    def _condition(
        self,
        x_RT: np.ndarray,
        masked: np.ndarray,
        vis: np.ndarray,
        groups: list[tuple[np.ndarray, np.ndarray]],
        t0: int,
        P: int,
        lams: Sequence[float],
    ) -> list[np.ndarray]:
        """E[x_r(t) | x_V(t), x_r(S_r)] for the masked parcels r at t in [t0, t0 + P), one [M, P] per lam.

        The joint system over [x_V(t), x_r(S)] is solved by blocks. Its V x V block A = C_VV + lam s I is the same
        for every r and t and is solved once. The rest reduces to a small Schur complement per (r, t), of size
        |S| (up to 2 patches). With B = Cov(x_V(t), x_r(S)), y = Cov(., x_r(t)) and f the centred features:
            E = mu_r + y_V' A^-1 f_V + (y_S - B' A^-1 y_V)' (D - B' A^-1 B)^-1 (f_S - B' A^-1 f_V),
        D = Cov(x_r(S), x_r(S)) + lam s I. The columns of B are lagged covariances C(S_j - t)[V, r], and within
        a group (shared S) the lags S_j - t take at most 4P - 2 values: A^-1 is applied to those columns only.

        Every lam shares one eigendecomposition C_VV = Q diag(e) Q' (A^-1 = Q diag(1 / (e + lam s)) Q'): Q' is
        applied once to the features, C_VM and the lagged columns, and each lam only rescales them, where a solve
        per lam cost as much as that one product (a settings search tries 4)."""
        mu, full, off = self.mu_R, self.full, self.offset
        V = len(vis)
        t_P = np.arange(t0, t0 + P)
        f_VP = x_RT[vis][:, t_P] - mu[vis, None]
        C_VM = self.cov_RR[np.ix_(vis, masked)]
        e_V, Q_VV = np.linalg.eigh(self.cov_RR[np.ix_(vis, vis)]) if V else (np.zeros(0), np.zeros((0, 0)))
        F_VP, G_VM = Q_VV.T @ f_VP, Q_VV.T @ C_VM  # rotated into C_VV's eigenbasis
        # Every group's distinct lagged columns L [lags, V, g], rotated: W [g, V, lags].
        lagged = []
        for rows, S in groups:
            lags, idx_PS = np.unique(S[None, :] - t_P[:, None], return_inverse=True)
            L = full[np.ix_(lags + off, vis, masked[rows])].astype(np.float64)
            rs = masked[rows]
            nl, g = len(lags), len(rows)
            W_gVl = (Q_VV.T @ L.transpose(1, 0, 2).reshape(V, nl * g)).reshape(V, nl, g).transpose(2, 0, 1)
            lagged.append(
                (  # contiguous: numpy's stacked matmul is 2x faster on them than on the transposed views
                    np.ascontiguousarray(W_gVl),
                    np.ascontiguousarray(W_gVl.transpose(0, 2, 1)),
                    idx_PS.reshape(P, len(S)),
                    full[:, rs, rs].astype(np.float64),  # [lags, g]: C_rr(lag)
                    (x_RT[rs][:, S] - mu[rs, None])[:, None, :],
                )
            )
        outs = []
        for lam in lams:
            ridge = lam * self.scale
            d_V = 1.0 / (e_V + ridge)
            dF_VP = d_V[:, None] * F_VP  # Q' A^-1 f_V
            out = mu[masked, None] + G_VM.T @ dF_VP
            for (rows, S), (W_gVl, W_glV, idx_PS, diag, f_S) in zip(groups, lagged, strict=True):
                dW_gVl = d_V[None, :, None] * W_gVl  # Q' A^-1 B's columns
                # Schur complements [g, P, s, s]: D - B' A^-1 B, B' A^-1 B gathered from the distinct lags.
                BKB = W_glV @ dW_gVl
                schur = diag[S[None, :] - S[:, None] + off].transpose(2, 0, 1)[:, None] + ridge * np.eye(len(S))
                schur = schur - BKB[:, idx_PS[:, :, None], idx_PS[:, None, :]]
                # u = f_S - B' A^-1 f_V and v = y_S - B' A^-1 y_V: [g, P, s].
                BKf = (W_glV @ dF_VP)[:, idx_PS, np.arange(P)[:, None]]
                BKy = np.einsum("gvl,vg->gl", dW_gVl, G_VM[:, rows], optimize=True)[:, idx_PS]
                v = diag[t_P[:, None] - S[None, :] + off].transpose(2, 0, 1) - BKy
                out[rows] += (v * np.linalg.solve(schur, (f_S - BKf)[..., None])[..., 0]).sum(-1)
            outs.append(out)
        return outs


# -- the fitted baselines and their settings -------------------------------------------------------------------


LAMBDAS = (1e-3, 1e-2, 1e-1, 1.0)
ALPHAS = (0.1, 0.25, 0.5, 0.75)
BETAS = (0.25, 0.5, 0.75, 1.0)
# The linear baselines: the GaussianImputer method each runs, and the grid its settings are chosen from. The +ctx ones
# see the window's recording context: their population covariance is shrunk toward the context windows' own,
# (1 - beta) C + beta C_context (the context-ridge and context-adaptive baselines).
LINEAR = {
    "ridge": ("spatial", {"lam": LAMBDAS}),
    "spatiotemporal": ("spatiotemporal", {"lam": LAMBDAS}),
    "adaptive": ("adaptive", {"lam": LAMBDAS, "alpha": ALPHAS}),
    "ridge+ctx": ("spatial", {"lam": LAMBDAS, "beta": BETAS}),
    "adaptive+ctx": ("adaptive", {"lam": LAMBDAS, "alpha": ALPHAS, "beta": BETAS}),
}
CONTEXT_BASELINES = ("ridge+ctx", "adaptive+ctx")


@dataclass
class Baselines:
    """The fitted baselines and, per masking strategy, the settings each linear one chose on validation."""

    mean_R: np.ndarray
    gaussian: GaussianImputer
    val_BRT: np.ndarray
    mask_ratio: float
    chosen: dict[str, dict[str, dict[str, float]]]
    val_context: list[list[int]] | None = None  # each validation window's context windows (the +ctx baselines)
    # (count, masking) -> the protocol's value masks [count, R, T] of the evaluated model's tokens (its
    # ``masks_from_seeds``: image patches for a ViT-MAE); None: BrainLM's tokens of ``P`` timepoints
    value_masks: Callable[[int, str], np.ndarray] | None = None

    @classmethod
    def fit(
        cls,
        train_BRT: np.ndarray,
        val_BRT: np.ndarray,
        mask_ratio: float,
        patch_size: int,
        val_context: list[list[int]] | None = None,
        value_masks: Callable[[int, str], np.ndarray] | None = None,
        device: str | torch.device = "cpu",
    ) -> Baselines:
        """Means and the Gaussian model from training windows; settings are chosen on ``val_BRT`` when asked; the
        ridge / adaptive imputations run on ``device``."""
        train = np.asarray(train_BRT)
        gaussian = GaussianImputer(train, max_lag=(2 * REACH + 1) * patch_size, device=device)
        val = np.asarray(val_BRT, dtype=np.float64)
        return cls(train.mean(axis=(0, 2)), gaussian, val, mask_ratio, {}, val_context, value_masks)

    def predict(
        self,
        name: str,
        x_BRT: np.ndarray,
        tmask_BRT: np.ndarray,
        P: int,
        masking: str,
        context: list[list[int]] | None = None,
    ) -> np.ndarray:
        if name == "zero":
            return np.zeros(x_BRT.shape)
        if name == "mean":
            return np.broadcast_to(self.mean_R[None, :, None], x_BRT.shape)
        if name == "interp":
            return interpolate(x_BRT, tmask_BRT, self.mean_R)
        settings = self.settings_of(name, masking, P)
        return next(self._predictions(name, [settings], x_BRT, tmask_BRT, P, context))[1]

    def _predictions(
        self, name: str, candidates: list[dict[str, float]], x_BRT, tmask_BRT, P: int, context
    ) -> Iterator[tuple[int, np.ndarray]]:
        """(index, predictions) of each candidate setting, in an order that computes what they share once: the
        context statistics, each beta's covariances, the spatio-temporal gathers (across lam), the adaptive first pass
        (across alpha)."""
        g, method = self.gaussian, LINEAR[name][0]
        if method == "spatiotemporal":
            yield from enumerate(g.spatiotemporal_grid(x_BRT, tmask_BRT, P, [c["lam"] for c in candidates]))
            return
        stats = context_statistics(x_BRT, context or [[]] * len(x_BRT)) if "beta" in candidates[0] else None
        first: dict[tuple, np.ndarray] = {}  # the spatial pass of the latest (lam, beta), shared across alpha
        shrunk: dict[float, np.ndarray] = {}  # the latest beta's covariances [B, R, R], shared across lam and alpha
        for i in sorted(range(len(candidates)), key=lambda i: (candidates[i].get("beta", 0), candidates[i]["lam"])):
            c = candidates[i]
            if stats is not None and c["beta"] not in shrunk:
                shrunk = {c["beta"]: shrink_toward_context(g.cov_RR, *stats, c["beta"])}
            cov = None if stats is None else shrunk[c["beta"]]
            if method == "spatial":
                yield i, g.spatial(x_BRT, tmask_BRT, P, c["lam"], cov)
                continue
            key = (c["lam"], c.get("beta"))
            if key not in first:
                first = {key: g.spatial(x_BRT, tmask_BRT, P, c["lam"], cov)}
            yield i, g.adaptive(x_BRT, tmask_BRT, P, c["lam"], c["alpha"], cov_BRR=cov, start_BRT=first[key])

    def settings_of(self, name: str, masking: str, P: int) -> dict[str, float]:
        """A linear baseline's settings for a masking strategy: the best on the validation windows."""
        chosen = self.chosen.setdefault(name, {})
        if masking not in chosen:
            R, T = self.val_BRT.shape[1:]
            if self.value_masks is not None:
                tmask = self.value_masks(len(self.val_BRT), masking)
            else:
                tmask = time_mask(fixed_masks(len(self.val_BRT), R, T // P, self.mask_ratio, masking), R, T // P, P)
            grid = LINEAR[name][1]
            candidates = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
            scores = np.empty(len(candidates))
            runs = self._predictions(name, candidates, self.val_BRT, tmask, P, self.val_context)
            desc = f"{name}: settings on {len(self.val_BRT)} val windows"
            for i, pred in progress.bar(runs, desc=desc, total=len(candidates), inner=True):
                scores[i] = r2_parts(pred, self.val_BRT, tmask)[0]
            chosen[masking] = candidates[int(np.argmax(scores))]
        return chosen[masking]


def shrink_toward_context(population_RR: np.ndarray, cov_BRR: np.ndarray, n_B: np.ndarray, beta: float) -> np.ndarray:
    """Each window's population covariance shrunk toward its context windows' covariance (``cov_BRR``, from
    ``context_statistics``): (1 - beta) C + beta C_context; C itself where a window has no context (``n_B`` 0)."""
    out = np.broadcast_to(population_RR, (len(cov_BRR), *population_RR.shape)).copy()
    has = n_B > 0
    out[has] = (1 - beta) * population_RR + beta * cov_BRR[has]
    return out


def map_windows(x_BRT: np.ndarray, from_R3: np.ndarray, to_Q3: np.ndarray) -> tuple[np.ndarray, float]:
    """Windows of one atlas carried onto another by parcel centres: each target parcel is the Gaussian-weighted mean
    of the source parcels around its centre (sigma: the median distance from a target centre to its nearest source
    centre, at least 5 mm), then robust-scaled per parcel as the build scales every recording. This is how a linear
    baseline uses data of another atlas, as the model does by placing parcels by their coordinates. Returns the
    windows [B, Q, T] and sigma in mm."""
    d_QR = np.linalg.norm(to_Q3[:, None, :] - from_R3[None, :, :], axis=-1)
    sigma = max(float(np.median(d_QR.min(axis=1))), 5.0)
    w_QR = np.exp(-0.5 * (d_QR / sigma) ** 2)
    w_QR /= w_QR.sum(axis=1, keepdims=True)
    mapped = np.einsum("qr,brt->bqt", w_QR, np.asarray(x_BRT, dtype=np.float64))
    flat = mapped.transpose(1, 0, 2).reshape(len(to_Q3), -1)
    median = np.median(flat, axis=1)
    iqr = np.subtract(*np.percentile(flat, [75, 25], axis=1))
    return (mapped - median[None, :, None]) / np.where(iqr > 0, iqr, 1.0)[None, :, None], sigma
