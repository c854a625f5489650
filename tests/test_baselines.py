"""The model-free reconstruction baselines: exact conditional expectations, and what each one can see."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from brainlm.eval.baselines import REACH, GaussianImputer, interpolate
from brainlm.protocol import fixed_masks, r2_parts, time_mask


def ar_windows(B: int, R: int, T: int, rho: float, coupling: float, seed: int = 0) -> np.ndarray:
    """[B, R, T] windows of a stationary process: AR(1) in time, parcels sharing one common AR(1) source."""
    rng = np.random.default_rng(seed)
    out = np.zeros((B, R, T + 50))
    common = np.zeros((B, T + 50))
    for t in range(1, T + 50):
        common[:, t] = rho * common[:, t - 1] + rng.normal(size=B)
        out[:, :, t] = rho * out[:, :, t - 1] + rng.normal(size=(B, R))
    return (out + coupling * common[:, None])[:, :, 50:]


def test_spatiotemporal_is_the_exact_gaussian_conditional():
    """Against the conditional computed from the full space-time covariance, entry by entry."""
    R, T, P = 3, 12, 4
    x = ar_windows(400, R, T, 0.8, 0.7)
    g = GaussianImputer(x, max_lag=T)
    test = ar_windows(3, R, T, 0.8, 0.7, seed=1)
    mask = torch.zeros(3, R * (T // P), dtype=torch.bool)
    mask[0, [1, 4, 5]] = True  # parcel 0 patch 1 (both neighbours visible), parcel 1 patches 1-2 (one gap)
    mask[1, [0, 3, 6, 7]] = True  # patch 0 of every parcel (no neighbour before), parcel 2 patches 0-1
    mask[2, [1, 6, 7, 8]] = True  # parcel 2 never visible (no neighbour) beside parcel 0 with both neighbours
    tmask = time_mask(mask, R, T // P, P)
    lam = 0.05
    pred = g.spatiotemporal(test, tmask, P, lam)

    def cov(i: int, t: int, j: int, s: int) -> float:
        return g.full[s - t + g.offset][i, j]

    for b in range(3):
        for r in range(R):
            for t in range(T):
                if not tmask[b, r, t]:
                    assert pred[b, r, t] == test[b, r, t]  # visible values pass through
                    continue
                n = t // P
                feats = [(j, t) for j in range(R) if not tmask[b, j, t]]
                for side in (range(n - 1, max(n - 1 - REACH, -1), -1), range(n + 1, min(n + 1 + REACH, T // P))):
                    m = next((m for m in side if not tmask[b, r, m * P]), None)  # the nearest visible patch
                    feats += [(r, s) for s in range(m * P, (m + 1) * P)] if m is not None else []
                A = np.array([[cov(i, ti, j, tj) for j, tj in feats] for i, ti in feats]) + lam * g.scale * np.eye(
                    len(feats)
                )
                y = np.array([cov(i, ti, r, t) for i, ti in feats])
                f = np.array([test[b, i, ti] - g.mu_R[i] for i, ti in feats])
                expected = g.mu_R[r] + np.linalg.solve(A, y) @ f
                assert pred[b, r, t] == pytest.approx(expected, abs=1e-5)


def test_spatiotemporal_uses_the_parcels_own_neighbouring_patches():
    """Weak coupling, strong autocorrelation: time carries the signal, so the spatio-temporal baseline beats the
    spatial ridge under random and tube masking, and equals it under parcel masking (no neighbour is visible)."""
    R, T, P = 6, 40, 4
    train, test = ar_windows(200, R, T, 0.95, 0.3), ar_windows(40, R, T, 0.95, 0.3, seed=1)
    g = GaussianImputer(train, max_lag=5 * P)
    scores = {}
    for masking in ("random", "tube", "parcel"):
        tmask = time_mask(fixed_masks(len(test), R, T // P, 0.5, masking), R, T // P, P)
        scores[masking] = {
            "ridge": r2_parts(g.spatial(test, tmask, P, 0.01), test, tmask)[0],
            "st": r2_parts(g.spatiotemporal(test, tmask, P, 0.01), test, tmask)[0],
            "interp": r2_parts(interpolate(test, tmask, g.mu_R), test, tmask)[0],
        }
    assert scores["random"]["st"] > scores["random"]["ridge"] + 0.1
    # Tube masking hides every parcel at once: only time helps, and the conditional beats interpolation in time.
    assert scores["tube"]["st"] > scores["tube"]["interp"] > scores["tube"]["ridge"] + 0.5
    assert scores["parcel"]["st"] == pytest.approx(scores["parcel"]["ridge"], abs=1e-9)


def test_adaptive_follows_each_windows_own_coupling():
    """Two parcel pairs coupled with a sign that flips from window to window: the cohort's covariance averages the
    coupling away, so the spatial ridge learns nothing, while the window's own covariance recovers it."""
    rng = np.random.default_rng(0)

    def windows(B: int) -> np.ndarray:
        out = np.zeros((B, 4, 40))
        for b in range(B):
            for pair in ((0, 1), (2, 3)):
                common = rng.normal(size=40)
                sign = rng.choice([-1.0, 1.0])
                out[b, pair[0]] = common + 0.3 * rng.normal(size=40)
                out[b, pair[1]] = sign * common + 0.3 * rng.normal(size=40)
        return out

    train, test = windows(200), windows(40)
    g = GaussianImputer(train, max_lag=4)
    tmask = time_mask(fixed_masks(len(test), 4, 10, 0.5, "random"), 4, 10, 4)
    ridge = r2_parts(g.spatial(test, tmask, 4, 0.01), test, tmask)[0]
    adaptive = r2_parts(g.adaptive(test, tmask, 4, 0.01, alpha=0.8), test, tmask)[0]
    # Measured: ridge -0.001, adaptive 0.20 (a masked parcel's partner is itself masked half of the time).
    assert ridge < 0.02 and adaptive > ridge + 0.15


# ---------------------------------------------------------------- the model's Gaussian prior (brainlm/model/prior.py)


def reference_adaptive(x_BRT, mask_BRN, mu_R, cov_BRR, P, ridge, alpha, passes):
    """The conditional expectation written plainly: per window and token column, a solve over the visible parcels
    (none visible: the means; none masked: the signal), then ``passes`` re-estimations of the window's covariance."""

    def spatial(cov_of):
        out = x_BRT.astype(np.float64).copy()
        for b in range(len(x_BRT)):
            cov = cov_of(b)
            for n in range(mask_BRN.shape[2]):
                m, sl = mask_BRN[b, :, n], slice(n * P, (n + 1) * P)
                v = ~m
                if not m.any():
                    continue
                if not v.any():
                    out[b, :, sl] = mu_R[:, None]
                    continue
                w = np.linalg.solve(cov[np.ix_(v, v)] + ridge * np.eye(v.sum()), cov[np.ix_(v, m)])
                out[b, m, sl] = mu_R[m, None] + w.T @ (x_BRT[b, v, sl] - mu_R[v, None])
        return out

    pred = spatial(lambda b: cov_BRR[b])
    for _ in range(passes):
        xc = pred - mu_R[None, :, None]
        own = np.einsum("brt,bqt->brq", xc, xc) / x_BRT.shape[2]
        pred = spatial(lambda b, own=own: (1 - alpha) * cov_BRR[b] + alpha * own[b])
    return pred


@pytest.mark.parametrize(
    ("masking", "B", "R", "T", "P"),
    [("random", 5, 6, 24, 4), ("parcel", 5, 6, 24, 4), ("mixed", 6, 7, 24, 4), ("random", 16, 300, 100, 20)],
)
def test_gaussian_imputation_is_the_conditional_expectation(masking, B, R, T, P):
    """The one Gaussian imputation (brainlm/model/prior.py, batched in torch), which the decoder's prior and the
    ridge / adaptive baselines both run, against the conditional expectation written plainly, to float precision:
    masks of either kind and mixed (windows with every token of a patch masked or visible, windows whose columns
    share a visible set beside windows whose columns do not), a population covariance or one per window (the
    context baselines), a given first pass, and a training batch of 300 parcels (the Cholesky solve; the batched LU
    it replaced returned garbage pivots under multi-threaded MKL on a batch of the synthetic cohort, a failure that
    depends on the data and the threads and that these AR windows do not trigger)."""
    from brainlm.model import prior

    train = ar_windows(64, R, T, 0.8, 0.9)
    test = ar_windows(B, R, T, 0.8, 0.9, seed=3) * np.linspace(0.5, 2.0, R)[None, :, None]  # its own covariance
    g = GaussianImputer(train, max_lag=P)
    mu, cov = prior.fit(torch.from_numpy(train))
    np.testing.assert_allclose(mu.numpy(), g.mu_R, atol=1e-12)
    np.testing.assert_allclose(cov.numpy(), g.cov_RR, atol=1e-12)
    N = T // P
    if masking == "mixed":
        mask = torch.cat([fixed_masks(3, R, N, 0.5, "parcel"), fixed_masks(3, R, N, 0.5, "random")])
        mask = mask.reshape(B, R, N)
        mask[0, :, 1], mask[1, :, 2], mask[4, :, 0] = True, False, True  # all masked, none masked
        mask = mask.reshape(B, R * N)
    else:
        mask = fixed_masks(B, R, N, 0.5, masking)
    tmask, mask_BRN = time_mask(mask, R, N, P), mask.reshape(B, R, N).numpy()
    population = np.broadcast_to(g.cov_RR, (B, R, R))
    ridge = 0.1 * g.scale
    expected = reference_adaptive(test, mask_BRN, g.mu_R, population, P, ridge, 0.5, 2)
    ours = prior.impute(torch.from_numpy(test), mask.reshape(B, R, N), mu, cov, P, 0.1, 0.5).numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-9)
    np.testing.assert_allclose(g.adaptive(test, tmask, P, 0.1, 0.5), expected, atol=1e-9)
    spatial = reference_adaptive(test, mask_BRN, g.mu_R, population, P, ridge, 0.5, 0)
    np.testing.assert_allclose(g.spatial(test, tmask, P, 0.1), spatial, atol=1e-9)
    np.testing.assert_allclose(g.adaptive(test, tmask, P, 0.1, 0.5, start_BRT=spatial), expected, atol=1e-9)
    np.testing.assert_allclose(ours[~tmask], test[~tmask], atol=1e-12)  # visible values: the signal itself
    assert r2_parts(ours, test, tmask)[0] > r2_parts(spatial, test, tmask)[0]
    # One covariance per window (the context baselines).
    own = np.stack([np.cov(w) + 0.1 * np.eye(R) for w in test])
    expected = reference_adaptive(test, mask_BRN, g.mu_R, own, P, ridge, 0.5, 2)
    np.testing.assert_allclose(g.adaptive(test, tmask, P, 0.1, 0.5, cov_BRR=own), expected, atol=1e-9)


def test_lagged_products_equal_the_sum_over_timepoints():
    """The FFT's lagged products against the direct sums, for every lag (none wraps around the window's end)."""
    from brainlm.eval.baselines import lagged_products

    x = np.random.default_rng(3).normal(size=(4, 70, 9))
    got = lagged_products(x, 9, rows=16)  # several row blocks, the last one short
    for tau in range(9):
        np.testing.assert_allclose(got[tau], np.einsum("bit,bjt->ij", x[:, :, : 9 - tau], x[:, :, tau:]), atol=1e-12)


def test_window_chunks_cover_every_window_once_and_keep_every_thread_busy():
    """The batched solves' chunks: in order, none over the size, as many as a multiple of the threads where there are
    enough windows (24 in 8s over 2 threads would leave one thread idle a third of the time)."""
    from brainlm.eval.baselines import chunks

    for n, size, workers, count in [(24, 8, 2, 4), (16, 8, 2, 2), (17, 8, 2, 4), (5, 8, 2, 2), (1, 8, 2, 1),
                                    (3, 8, 4, 3), (100, 8, 1, 13)]:  # fmt: skip
        parts = chunks(n, size, workers)
        assert [i for s in parts for i in range(s.start, s.stop)] == list(range(n))
        assert all(0 < s.stop - s.start <= size for s in parts)
        assert len(parts) == count
    assert [s.stop - s.start for s in chunks(24, 8, 2)] == [6, 6, 6, 6]
    assert chunks(0, 8, 2) == []


def test_a_settings_search_computes_each_candidate_as_if_alone():
    """The search shares work across candidates (each beta's covariances, each (lam, beta)'s first pass, in an order of
    its own): every candidate's prediction must still be what that setting gives computed on its own, in the
    candidates' order."""
    from brainlm.eval.baselines import LINEAR, Baselines, shrink_toward_context
    from brainlm.model.context import context_statistics

    B, R, T, P = 6, 7, 24, 4
    train, val = ar_windows(32, R, T, 0.8, 0.9), ar_windows(B, R, T, 0.8, 0.9, seed=5)
    context = [[j for j in range(B) if j // 3 == b // 3 and j != b] for b in range(B)]  # two recordings of 3
    base = Baselines.fit(train, val, 0.5, P, val_context=context)
    tmask = time_mask(fixed_masks(B, R, T // P, 0.5, "random"), R, T // P, P)
    stats = context_statistics(val, context)
    for name in ("ridge+ctx", "adaptive+ctx", "adaptive"):
        grid = LINEAR[name][1]
        candidates = [dict(zip(grid, v, strict=True)) for v in itertools.product(*grid.values())]
        got = dict(base._predictions(name, candidates, val, tmask, P, context))
        assert sorted(got) == list(range(len(candidates)))
        for i, c in enumerate(candidates):
            cov = shrink_toward_context(base.gaussian.cov_RR, *stats, c["beta"]) if "beta" in c else None
            alone = (
                base.gaussian.spatial(val, tmask, P, c["lam"], cov)
                if LINEAR[name][0] == "spatial"
                else base.gaussian.adaptive(val, tmask, P, c["lam"], c["alpha"], cov_BRR=cov)
            )
            np.testing.assert_allclose(got[i], alone, atol=1e-12, err_msg=f"{name} {c}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_imputations_on_a_gpu_equal_the_cpu_ones():
    """`brainlm reconstruct --device cuda` runs the ridge / adaptive imputations on the GPU, in batches of
    GPU_WINDOWS windows: the same figures as on the CPU (float64 both), a population covariance or one per window."""
    from brainlm.eval.baselines import GPU_WINDOWS

    R, T, P = 300, 100, 20
    B = GPU_WINDOWS + 6  # two batches, the last one short
    train, test = ar_windows(64, R, T, 0.8, 0.9), ar_windows(B, R, T, 0.8, 0.9, seed=3)
    cpu, gpu = GaussianImputer(train, P), GaussianImputer(train, P, device="cuda")
    own = np.stack([np.cov(w) + 0.1 * np.eye(R) for w in test])
    for masking in ("random", "parcel"):
        tmask = time_mask(fixed_masks(B, R, T // P, 0.5, masking), R, T // P, P)
        np.testing.assert_allclose(gpu.adaptive(test, tmask, P, 0.1, 0.5), cpu.adaptive(test, tmask, P, 0.1, 0.5),
                                   atol=1e-8)  # fmt: skip
        np.testing.assert_allclose(gpu.spatial(test, tmask, P, 0.1, own), cpu.spatial(test, tmask, P, 0.1, own),
                                   atol=1e-8)  # fmt: skip
