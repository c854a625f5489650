"""The evaluation protocol (brainlm/protocol): subject folds that never test on what they train or validate on,
paired bootstrap intervals that call a tie a tie, one R^2 from sums, and baselines fitted on the data the model saw."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from brainlm.exceptions import InputError
from brainlm.protocol import UnitScores, WindowSums, compare, fixed_masks, r2_parts, subject_folds, time_mask
from tests.conftest import make_signal, write_atlas_table

SUBJECTS = [f"s{i}" for i in range(7)]


@pytest.mark.parametrize("k,val", [(7, 1), (3, 1), (2, 2), (4, 0)])
def test_every_subject_is_tested_once_and_never_trained_or_validated_on_in_its_fold(k, val):
    folds = subject_folds(SUBJECTS, k, val, seed=3)
    assert len(folds) == k
    tested = [s for f in folds for s in f.test]
    assert sorted(tested) == SUBJECTS  # each subject a test subject exactly once
    for f in folds:
        assert not set(f.test) & (set(f.train) | set(f.val)), f
        assert not set(f.val) & set(f.train) and len(f.val) == val, f
        assert sorted(f.train + f.val + f.test) == SUBJECTS
        assert f.split_of() == {
            **dict.fromkeys(f.train, "train"),
            **dict.fromkeys(f.val, "val"),
            **dict.fromkeys(f.test, "test"),
        }
    assert subject_folds(SUBJECTS, k, val, seed=3) == folds  # deterministic
    assert subject_folds(SUBJECTS, k, val, seed=4) != folds or k == 7


def test_folds_that_cannot_be_made_are_refused_with_the_numbers():
    with pytest.raises(InputError, match="only 7 subjects; use at most 7 folds"):
        subject_folds(SUBJECTS, 8)
    with pytest.raises(InputError, match="at least 2"):
        subject_folds(SUBJECTS, 1)
    with pytest.raises(InputError, match="leaves no training subject"):
        subject_folds(SUBJECTS[:3], 3, val_subjects=2)


def _sums(rng, subjects_W, noise: dict[str, float]) -> WindowSums:
    """Windows whose methods predict the target with the given noise levels."""
    W = len(subjects_W)
    x = rng.standard_normal((W, 4, 10))
    tmask = rng.random((W, 4, 10)) < 0.5
    preds = {m: x + s * rng.standard_normal(x.shape) for m, s in noise.items()}
    return WindowSums.of(preds, x, tmask), x, tmask, preds


def test_window_sums_give_the_pooled_r2_of_any_set_of_windows():
    rng = np.random.default_rng(0)
    subjects = np.repeat(["a", "b", "c"], 5)
    sums, x, tmask, preds = _sums(rng, subjects, {"model": 0.5, "ridge": 0.7})
    assert sums.r2("model") == pytest.approx(r2_parts(preds["model"], x, tmask)[0], abs=1e-12)
    rows = np.array([0, 3, 3, 7])  # a resample: window 3 twice
    stacked = (np.concatenate([preds["model"][r : r + 1] for r in rows]), x[rows], tmask[rows])
    weights = np.bincount(rows, minlength=len(x))
    assert sums.r2("model", weights) == pytest.approx(r2_parts(*stacked)[0], abs=1e-12)
    again = WindowSums.from_json(json.loads(json.dumps(sums.to_json())))
    halves = WindowSums.concat([again.subset(np.arange(8)), again.subset(np.arange(8, 15))])
    assert halves.r2("ridge") == pytest.approx(sums.r2("ridge"), abs=1e-12)


def test_r2_per_parcel_is_each_parcels_masked_values_alone():
    """Pooled and per-parcel R^2 against 1 - SSE / SST written out; a parcel with fewer than 2 masked values is NaN."""
    rng = np.random.default_rng(1)
    x, pred = rng.standard_normal((6, 5, 12)), rng.standard_normal((6, 5, 12))
    tmask = rng.random(x.shape) < 0.5
    tmask[:, 3] = False
    tmask[2, 3, 4] = True  # one masked value: no variance to explain

    def r2(m):
        return 1 - ((pred - x)[m] ** 2).sum() / ((x[m] - x[m].mean()) ** 2).sum()

    pooled, per = r2_parts(pred, x, tmask)
    assert pooled == pytest.approx(r2(tmask), abs=1e-12)
    for r in (0, 1, 2, 4):
        m = np.zeros_like(tmask)
        m[:, r] = tmask[:, r]
        assert per[r] == pytest.approx(r2(m), abs=1e-12)
    assert np.isnan(per[3])


def test_a_model_equal_to_its_baseline_is_a_tie_and_a_clear_margin_names_the_winner():
    rng = np.random.default_rng(1)
    subjects = np.repeat([f"sub{i}" for i in range(6)], 8)
    sums, *_ = _sums(rng, subjects, {"model": 0.6, "better": 0.3, "worse": 1.2})
    same = WindowSums(sums.target, {"model": sums.sse["model"], "copy": sums.sse["model"].copy()})
    tie = compare(same, subjects, "model", "copy")
    assert tie.margin == 0 and tie.windows[0] <= 0 <= tie.windows[1] and tie.subjects[0] <= 0 <= tie.subjects[1]
    assert tie.winner == "tie"
    # The same predictions with a sliver of noise: a margin near 0 whose intervals hold 0 is still a tie.
    jitter = WindowSums(
        sums.target,
        {"model": sums.sse["model"], "near": sums.sse["model"] * (1 + 1e-3 * rng.standard_normal(len(subjects)))},
    )
    assert compare(jitter, subjects, "model", "near").winner == "tie"
    win = compare(sums, subjects, "model", "worse")
    assert win.margin > 0 and win.windows[0] > 0 and win.subjects[0] > 0 and win.winner == "model"
    loss = compare(sums, subjects, "model", "better")
    assert loss.windows[1] < 0 and loss.winner == "better"
    assert set(win.per_subject) == {f"sub{i}" for i in range(6)} and all(v > 0 for v in win.per_subject.values())
    one = compare(sums.subset(subjects == "sub0"), subjects[subjects == "sub0"], "model", "worse")
    assert one.subjects is None and one.winner in ("model", "tie")  # one subject: the windows interval alone


def test_the_subject_interval_is_wider_when_subjects_disagree():
    rng = np.random.default_rng(2)
    subjects = np.repeat([f"sub{i}" for i in range(6)], 10)
    x = rng.standard_normal((60, 3, 10))
    tmask = np.ones_like(x, dtype=bool)
    # The model is better on three subjects and worse on the other three: every window says something, the people
    # disagree, and only the subject-level interval shows it.
    sign = np.where(np.isin(subjects, ["sub0", "sub1", "sub2"]), 0.3, 1.2)[:, None, None]
    preds = {"model": x + sign * rng.standard_normal(x.shape), "base": x + 0.8 * rng.standard_normal(x.shape)}
    c = compare(WindowSums.of(preds, x, tmask), subjects, "model", "base")
    assert c.subjects[1] - c.subjects[0] > c.windows[1] - c.windows[0]
    assert {k: v > 0 for k, v in c.per_subject.items()} == {f"sub{i}": i < 3 for i in range(6)}


def test_a_loss_margin_is_positive_when_the_first_method_is_better():
    subjects = np.repeat(["a", "b", "c", "d"], 3)
    rng = np.random.default_rng(3)
    losses = UnitScores({"model": rng.random(12) * 0.1, "fc": 1 + rng.random(12)}, higher_is_better=False)
    c = compare(losses, subjects, "model", "fc")
    assert c.margin == pytest.approx(losses.values["fc"].mean() - losses.values["model"].mean())
    assert c.margin > 0 and c.winner == "model"


def test_a_windows_context_is_the_rest_of_its_recording_never_overlapping_it_nearest_first():
    from brainlm.protocol import context_windows, parse_context

    recordings = ["a"] * 5 + ["b"] * 3
    starts = [0, 100, 200, 300, 400, 0, 50, 100]
    every = context_windows(recordings, starts, 100, None)
    assert every[2] == [1, 3, 0, 4] and every[0] == [1, 2, 3, 4]  # nearest first, the earlier on a tie
    assert every[5] == [7] and every[6] == []  # b's windows 50 apart overlap: never context
    for i, others in enumerate(every):
        assert all(recordings[j] == recordings[i] and abs(starts[j] - starts[i]) >= 100 for j in others)
    assert context_windows(recordings, starts, 100, 1)[2] == [1]
    assert context_windows(recordings, starts, 100, 0)[2] == []
    assert context_windows(recordings, starts, 100, None) == every  # deterministic
    assert parse_context("all") is None and parse_context("4") == 4
    with pytest.raises(InputError, match=r"expected 0 \(none\), K"):
        parse_context("some")


# -- baselines fitted on what the model saw ----------------------------------------------------------------------


def _shard_set(root: Path, seed: int, atlas_parcels: int = 7) -> Path:
    from data_prep.build import BuildConfig, build

    src = root / f"cohort{seed}"
    src.mkdir(parents=True)
    write_atlas_table(src / "atlas.tsv", atlas_parcels)
    rng = np.random.default_rng(seed)
    for s in range(6):
        np.save(src / f"sub-{seed}{s:02d}_task-rest_run-1_bold.npy", make_signal(rng, atlas_parcels, 160))
    out = root / f"shards{seed}"
    build(
        BuildConfig(
            inputs=str(src), out=str(out), tr=0.8, crop=40, stride=40, val_frac=0.2, test_frac=0.2, progress=False
        )
    )
    return out


def _model_on(shards: Path, folder: Path) -> Path:
    """A debug model with a Gaussian decoder prior fitted on ``shards``' training windows, exported as pretraining
    exports it (extra.json records the shard set)."""
    from brainlm.data.loader import fixed_samples
    from brainlm.data.shardset import ShardSet
    from brainlm.model import BrainLM, get_preset

    shard_set = ShardSet.open(str(shards))

    manifest = shard_set.manifest
    R = manifest.atlas.num_parcels
    torch.manual_seed(0)
    model = BrainLM(get_preset("debug", num_parcels=R, num_timepoints=40, decoder_prior="gaussian"))
    windows, _ = fixed_samples(shard_set, "train", 512, 40)
    model.fit_prior(windows, torch.tensor(manifest.atlas.coords(), dtype=torch.float32))
    record = {"shards": str(shards), "manifest_sha256": manifest.plan_sha256, "atlas": manifest.atlas.name}
    extra = {"atlas": {"name": manifest.atlas.name, "labels": manifest.atlas.labels}, "tr": manifest.tr}
    extra |= {"shards": str(shards), "manifest_sha256": manifest.plan_sha256, "trained_on": [record]}
    model.save_pretrained(folder, scaling=manifest.scaling, extra=extra)
    return folder


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("transfer")
    source, target = _shard_set(root, 1), _shard_set(root, 2)
    return {"source": source, "target": target, "other_atlas": _shard_set(root, 3, atlas_parcels=9), "root": root}


def test_transfer_baselines_are_fitted_on_the_source_when_the_models_prior_was(two_sets, tmp_path):
    from brainlm.eval.baselines import Baselines
    from brainlm.eval.common import load_context, split_windows
    from brainlm.eval.reconstruct import reconstruct

    model = _model_on(two_sets["source"], tmp_path / "model")
    m = reconstruct(
        str(model), str(two_sets["target"]), tmp_path / "r", strategies=("random",), mask_ratio=0.5, context=0
    )
    r2 = m["pooled_r2"]["random"]
    assert {"ridge@source", "adaptive@source", "ridge@both", "spatiotemporal@both"} <= set(r2), r2
    assert str(two_sets["source"]) in m["fitted_on"]["source"] and str(two_sets["target"]) in m["fitted_on"]["target"]
    assert str(two_sets["source"]) in m["fitted_on"]["model"]["prior"]  # the same atlas: the prior is not refitted
    assert (
        m["comparisons"]["random"]["best_baseline"] in r2 and len(m["window_sums"]["random"]["target"]) == m["windows"]
    )
    # ridge@source is the ridge imputation fitted on the source's training windows, nothing else.
    ctx = load_context(str(model), str(two_sets["source"]))
    src, _ = split_windows(ctx, "train", 512)
    tctx = load_context(str(model), str(two_sets["target"]))
    val, _ = split_windows(tctx, "val", 64)
    test, _ = split_windows(tctx, "test")
    x = test.numpy().astype(np.float64)
    tmask = time_mask(fixed_masks(len(x), 7, 2, 0.5, "random"), 7, 2, 20)
    own = Baselines.fit(src.numpy(), val.numpy(), 0.5, 20).predict("ridge", x, tmask, 20, "random")
    assert r2["ridge@source"] == pytest.approx(r2_parts(own, x, tmask)[0], abs=1e-9)
    assert r2["ridge@source"] != pytest.approx(r2["ridge"], abs=1e-6)  # the two fits differ: not one column twice


def test_refit_prior_fits_the_atlas_own_slot_on_the_target_training_split(two_sets, tmp_path):
    """A new cohort on an atlas seen in pretraining: --refit-prior replaces that atlas's prior statistics by the
    target's own (its training split), in that atlas's slot, leaving the other atlases' slots as they were; without it
    the pretraining statistics are used."""
    from brainlm.data.loader import fixed_samples
    from brainlm.data.shardset import ShardSet
    from brainlm.eval.common import load_context, split_windows
    from brainlm.model import BrainLM, prior

    # Pretrained on two atlases: slot 0 the other atlas's, slot 1 the source's (the target's atlas).
    folder = _model_on(two_sets["other_atlas"], tmp_path / "model")
    model = BrainLM.from_pretrained(folder)
    shard_set = ShardSet.open(str(two_sets["source"]))
    manifest = shard_set.manifest
    model.fit_prior(fixed_samples(shard_set, "train", 512, 40)[0], torch.tensor(manifest.atlas.coords()), slot=1)
    model.save_pretrained(folder, scaling=model.scaling, extra=model.extra)
    kept = load_context(str(folder), str(two_sets["target"]))
    refit = load_context(str(folder), str(two_sets["target"]), refit=True)
    assert kept.model.prior_slot(kept.coords_R3) == refit.model.prior_slot(refit.coords_R3) == 1
    assert kept.prior_fitted_on is None and "refitted" in refit.prior_fitted_on
    windows, _ = split_windows(refit, "train", prior.FIT_WINDOWS)
    cov = prior.fit(windows)[1].to(torch.float32)
    assert torch.allclose(refit.model.prior_for(refit.coords_R3)[1], cov, atol=1e-6)
    assert not torch.allclose(kept.model.prior_for(kept.coords_R3)[1], cov, atol=1e-3)
    assert torch.equal(refit.model.prior_cov_RR, kept.model.prior_cov_RR)  # the other atlas's slot is untouched


def test_a_model_trained_on_the_evaluated_shards_gets_no_source_columns_and_another_atlas_is_carried_over(
    two_sets, tmp_path
):
    from brainlm.eval.baselines import map_windows
    from brainlm.eval.reconstruct import reconstruct

    own = _model_on(two_sets["target"], tmp_path / "own")
    m = reconstruct(str(own), str(two_sets["target"]), tmp_path / "a", strategies=("random",), mask_ratio=0.5)
    assert not [k for k in m["pooled_r2"]["random"] if "@" in k] and not m["notes"]
    # Context (default all): the +ctx baselines see the other windows of each test window's recording.
    assert m["context"] == "all" and m["context_windows"] > 0
    assert {"ridge+ctx", "adaptive+ctx"} <= set(m["pooled_r2"]["random"])
    assert "context" in m["fitted_on"]["model"]
    other = _model_on(two_sets["other_atlas"], tmp_path / "other")
    m = reconstruct(str(other), str(two_sets["target"]), tmp_path / "b", strategies=("random",), mask_ratio=0.5)
    assert {"ridge@source", "adaptive@both"} <= set(m["pooled_r2"]["random"])
    assert any("another atlas" in n and "parcel centres" in n for n in m["notes"]), m["notes"]
    assert "carried from" in m["fitted_on"]["source"]
    assert "refitted" in m["fitted_on"]["model"]["prior"]  # another atlas: the prior is refitted on the target
    # Carried by centres: a parcel at the same place as a source parcel follows it; the rest are local averages.
    rng = np.random.default_rng(0)
    src = rng.standard_normal((3, 4, 50))
    coords = np.array([[0.0, 0, 0], [60, 0, 0], [0, 60, 0], [0, 0, 60]])
    mapped, sigma = map_windows(src, coords, coords[[2, 0]])
    assert mapped.shape == (3, 2, 50) and sigma == 5.0
    assert np.corrcoef(mapped[:, 1].ravel(), src[:, 0].ravel())[0, 1] > 0.999


def test_fingerprinting_needs_subjects_with_several_recordings(two_sets, tmp_path):
    from brainlm.eval.fingerprint import fingerprint

    model = _model_on(two_sets["target"], tmp_path / "m")
    with pytest.raises(InputError, match=r"at least 2 subjects with 2 or more recordings .* 1 recording\(s\) of 1"):
        fingerprint(str(model), str(two_sets["target"]), tmp_path / "f")
