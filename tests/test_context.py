"""Recording context: the decoder prior that reads the rest of the recording, the loader that gives a training
window its crop's context, and what the context may and may not hold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainlm.data.loader import crop_context, window_start
from brainlm.model import BrainLM, get_preset, prior
from brainlm.protocol import context_statistics, context_windows, fixed_masks


def _model(strength: float) -> BrainLM:
    torch.manual_seed(0)
    cfg = get_preset("debug", num_parcels=7, num_timepoints=40, decoder_prior="gaussian", prior_context=strength)
    model = BrainLM(cfg).eval()
    rng = np.random.default_rng(0)
    model.fit_prior(torch.from_numpy(rng.standard_normal((32, 7, 40))).float(), torch.randn(7, 3) * 40)
    return model


def test_context_changes_the_reconstruction_of_a_context_model_and_nothing_else():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((3, 7, 40))).float()
    mask = fixed_masks(3, 7, 2, 0.5, "random")
    mixing = rng.standard_normal((7, 7))
    context = (torch.from_numpy(np.stack([mixing @ mixing.T] * 3)), torch.tensor([400, 400, 0]))
    for strength, changes in ((100.0, True), (0.0, False)):
        model = _model(strength)
        coords = model.prior_coords_R3
        with torch.no_grad():
            alone = model(x, coords, mask_BL=mask).pred_BLP
            given = model(x, coords, mask_BL=mask, context=context).pred_BLP
        moved = (given - alone).abs().amax(dim=(1, 2))
        assert bool(moved[0] > 1e-4) == changes and bool(moved[1] > 1e-4) == changes, moved
        assert float(moved[2]) < 1e-6  # a window without context timepoints: the population covariance alone


def test_the_context_weight_grows_with_the_context_timepoints():
    cov = torch.eye(3, dtype=torch.float64)
    ctx = torch.full((3, 3, 3), 2.0, dtype=torch.float64)
    moved = prior.with_context(cov, ctx, torch.tensor([0, 100, 10_000]), strength=100.0)
    assert torch.equal(moved[0], cov) and torch.allclose(moved[1], (cov + ctx[1]) / 2)
    assert torch.allclose(moved[2], ctx[2], atol=0.05)


def test_a_training_windows_context_is_its_crop_outside_the_window():
    rng = np.random.default_rng(2)
    crop = rng.standard_normal((5, 200))
    start = window_start(200, 100, np.random.default_rng(7))
    assert start == window_start(200, 100, np.random.default_rng(7))  # the sample's seed decides: deterministic
    poisoned = crop.copy()
    poisoned[:, start : start + 100] = np.nan  # nothing of the window itself may reach its context
    cov, n = crop_context(poisoned, start, 100)
    assert n == 100 and np.isfinite(cov).all()
    rest = np.concatenate([crop[:, :start], crop[:, start + 100 :]], axis=1)
    np.testing.assert_allclose(cov, np.cov(rest), atol=1e-12)
    assert crop_context(crop[:, :100], 0, 100)[1] == 0  # a crop no longer than the window has no context


def test_evaluation_context_statistics_are_the_other_windows_of_the_recording():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 3, 10))
    context = context_windows(["a", "a", "a", "b"], [0, 10, 20, 0], 10, None)
    cov, n = context_statistics(x, context)
    assert list(n) == [20, 20, 20, 0] and not cov[3].any()
    np.testing.assert_allclose(cov[0], np.cov(np.concatenate([x[1], x[2]], axis=1)), atol=1e-12)


def test_the_python_api_gives_a_context_model_the_rest_of_the_recording():
    rng = np.random.default_rng(4)
    raw_TR = (rng.standard_normal((160, 7)) @ rng.standard_normal((7, 7))).astype(np.float32)  # [time, parcels]
    for strength, changes in ((100.0, True), (0.0, False)):
        model = _model(strength)
        coords = model.prior_coords_R3.numpy()
        alone = model.reconstruct(raw_TR, context=0, coords=coords, scaling="none", mask_ratio=0.5)
        given = model.reconstruct(raw_TR, coords=coords, scaling="none", mask_ratio=0.5)  # default: all
        assert len(given.prediction_WRT) == 4 and np.array_equal(alone.mask_WRT, given.mask_WRT)
        assert (np.abs(given.prediction_WRT - alone.prediction_WRT).max() > 1e-4) == changes


def test_a_context_model_on_crops_without_room_for_context_is_refused(tiny_shards):
    from brainlm.exceptions import ShardError
    from brainlm.training.plan import preflight
    from brainlm.training.recipe import load_recipe

    # tiny_shards has crops of 40 timepoints: a 40-timepoint window leaves no context in its crop.
    cfg = load_recipe(None, {"data.shards": str(tiny_shards), "model.num_timepoints": 40, "model.prior_context": 100.0,
                             "model.decoder_prior": "gaussian"})  # fmt: skip
    with pytest.raises(ShardError, match=r"crops \(40 timepoints\) are no longer than the window \(40\)"):
        preflight(cfg, "ds_config.json")
    assert preflight(load_recipe(None, {"data.shards": str(tiny_shards), "model.num_timepoints": 20,
                                        "model.prior_context": 100.0, "model.decoder_prior": "gaussian"}),
                     "ds_config.json").model.prior_context == 100.0  # fmt: skip
