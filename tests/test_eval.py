"""The analyses end to end on a synthetic cohort whose ground truth is known, with a model trained here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from brainlm.exceptions import DimensionError, InputError
from tests.conftest import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict[str, Path]:
    """40 subjects x 2 runs (half task), 60 of the atlas's parcels; a debug model pretrained on it (~30 s)."""
    root = tmp_path_factory.mktemp("eval")
    assert (
        run_cli(
            "-m",
            "data_prep",
            "synth",
            "--out",
            str(root / "cohort"),
            "--subjects",
            "40",
            "--timepoints",
            "300",
            "--parcels",
            "60",
            "--task-fraction",
            "0.5",
        ).returncode
        == 0
    )
    build = run_cli(
        "-m",
        "data_prep",
        "build",
        "--inputs",
        str(root / "cohort"),
        "--out",
        str(root / "shards"),
        "--val-frac",
        "0.2",
        "--test-frac",
        "0.25",
        "--quiet",
    )
    assert build.returncode == 0, build.stderr
    uri = f"sqlite:///{root / 'mlflow.db'}"
    train = run_cli(
        "launcher/pretrain.py",
        "--config",
        "configs/pretrain/debug.yaml",
        "--data.shards",
        str(root / "shards"),
        "--train.out_dir",
        str(root / "run"),
        "--train.max_steps",
        "1200",
        "--train.micro_batch_size",
        "16",
        "--train.log_every",
        "400",
        "--train.val_every",
        "0",
        "--train.ckpt_every",
        "0",
        "--data.num_workers",
        "0",
        "--tracking.tracking_uri",
        uri,
        "--tracking.register_as",
        "brainlm-eval",
    )
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-2000:]
    return {"root": root, "shards": root / "shards", "model": root / "run" / "model", "uri": uri}


def brainlm(*args: str, **env) -> tuple[dict, str]:
    proc = run_cli("-m", "brainlm.cli", *args, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = Path(args[args.index("--out") + 1])
    return json.loads((out / "metrics.json").read_text()), proc.stdout


def test_reconstruction_beats_the_simple_baselines_by_registry_uri(cohort, tmp_path):
    metrics, stdout = brainlm(
        "reconstruct",
        "--model",
        "models:/brainlm-eval@current",
        "--shards",
        str(cohort["shards"]),
        "--out",
        str(tmp_path / "r"),
        "--masking",
        "random,future",
        MLFLOW_TRACKING_URI=cohort["uri"],
        BRAINLM_CACHE=str(tmp_path / "cache"),
    )
    r2 = metrics["pooled_r2"]["random"]
    assert r2["model"] > max(r2["zero"], r2["mean"], r2["interp"]) + 0.1, r2
    context = {"ridge+ctx", "adaptive+ctx"}  # the default context (all): the rest of each window's recording
    assert set(r2) == {"model", "zero", "mean", "interp", "ridge", "spatiotemporal", "adaptive", *context}
    assert "winner" in stdout and metrics["context"] == "all"
    per = metrics["per_parcel_r2"]["random"]["model"]
    assert len(per["values"]) == 60 and per["median"] == pytest.approx(np.nanmedian(per["values"]), abs=1e-4)
    assert (tmp_path / "r" / "reconstruction.png").stat().st_size > 1000
    assert (tmp_path / "r" / "per_parcel_r2.png").exists()
    again, _ = brainlm(
        "reconstruct",
        "--model",
        str(cohort["model"]),
        "--shards",
        str(cohort["shards"]),
        "--out",
        str(tmp_path / "r2"),
        "--masking",
        "random",
    )
    # fixed windows and masks: the same numbers every run
    assert again["pooled_r2"]["random"] == metrics["pooled_r2"]["random"]


def test_fixed_masks_are_seeded_and_follow_their_strategy():
    from brainlm.protocol import fixed_masks

    N = 2  # 40 timepoints in patches of 20
    a, b = fixed_masks(5, 7, N, 0.5, "random"), fixed_masks(5, 7, N, 0.5, "random")
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])
    future = fixed_masks(3, 7, N, 0.5, "future").reshape(3, 7, 2)
    assert future[:, :, 1].all() and not future[:, :, 0].any()


def test_embeddings_are_deterministic_per_recording(cohort, tmp_path):
    first, _ = brainlm(
        "embed",
        "--model",
        str(cohort["model"]),
        "--shards",
        str(cohort["shards"]),
        "--out",
        str(tmp_path / "a"),
        "--splits",
        "test",
    )
    brainlm(
        "embed",
        "--model",
        str(cohort["model"]),
        "--shards",
        str(cohort["shards"]),
        "--out",
        str(tmp_path / "b"),
        "--splits",
        "test",
    )
    a, b = np.load(tmp_path / "a" / "embeddings.npz"), np.load(tmp_path / "b" / "embeddings.npz")
    assert np.array_equal(a["cls"], b["cls"]) and a["cls"].shape == (first["recordings"], first["dim"])
    assert first["recordings"] == 20  # 10 test subjects x 2 runs
    assert (tmp_path / "a" / "embeddings.tsv").read_text().count("\n") == 21


def test_finetune_finds_age_and_nothing_in_the_null_trait(cohort, tmp_path):
    args = [
        "--model",
        str(cohort["model"]),
        "--shards",
        str(cohort["shards"]),
        "--freeze",
        "--epochs",
        "6",
        "--seeds",
        "2",
        "--lr",
        "0.003",
    ]
    age, stdout = brainlm("finetune", *args, "--target", "age", "--out", str(tmp_path / "age"))
    null, _ = brainlm("finetune", *args, "--target", "null_trait", "--out", str(tmp_path / "null"))
    assert set(age["table"]) == {
        *("probe_mlp", "chance", "svr_raw", "fc_ridge", "probe", "probe_latent_fc"),
        *("probe_mlp_random", "probe_random", "probe_latent_fc_random"),  # the random-weights control
    }
    assert "winner" in stdout and "probe_mlp vs probe_mlp_random" in stdout
    c = age["comparisons"]["model_vs_best_baseline"]
    assert c["b"] == "fc_ridge" and c["interval_subjects"][0] <= c["margin"] <= c["interval_subjects"][1], c
    assert set(age["comparisons"]) == {"model_vs_best_baseline"} | {
        f"{m}_vs_random_weights" for m in ("probe_mlp", "probe", "probe_latent_fc")
    }
    assert age["table"]["fc_ridge"]["r2"] > 0.5  # the coupling that carries age is in the FC ...
    assert age["table"]["probe_latent_fc"]["r2"] > 0.2, age["table"]  # ... and in the model's latent connectivity
    best_null = max(v["r2"] for k, v in null["table"].items() if k != "chance")
    assert best_null < 0.2, null["table"]  # a model that "predicts" the null trait would be leaking
    assert age["table"]["probe_mlp"]["r2"] > null["table"]["probe_mlp"]["r2"]
    assert len(age["seeds"]) == 2 and age["subjects"] == {"train": 22, "val": 8, "test": 10}
    from brainlm.model import BrainLMForPrediction

    model = BrainLMForPrediction.from_pretrained(tmp_path / "age" / "model")
    coords = torch.tensor(model.backbone.extra["atlas"]["coords_mm"])
    assert model(torch.randn(2, 60, 100), coords).shape == (2, 1)
    assert model.backbone.extra["transform"]["kind"] == "zscore"


def test_finetune_classifies_sex_with_probabilities_and_the_fc_baseline(cohort, tmp_path):
    metrics, stdout = brainlm(
        "finetune",
        "--model",
        str(cohort["model"]),
        "--shards",
        str(cohort["shards"]),
        "--out",
        str(tmp_path / "sex"),
        "--target",
        "sex",
        "--task",
        "classification",
        "--freeze",
        "--epochs",
        "3",
        "--seeds",
        "1",
        "--no-control",
    )
    t = metrics["table"]
    assert metrics["primary_metric"] == "accuracy" and "higher is better" in stdout
    assert set(t) == {"probe_mlp", "chance", "svr_raw", "fc_ridge", "probe", "probe_latent_fc"}  # --no-control
    assert all(0.0 <= v["accuracy"] <= 1.0 and 0.0 <= v["auc"] <= 1.0 for v in t.values())
    assert t["chance"]["auc"] == 0.5
    assert t["fc_ridge"]["auc"] > 0.7, t  # sex shifts a network coupling: the FC sees it


def test_target_transforms_invert():
    from brainlm.model.heads import Transform

    y = np.array([0.0, 3.0, 10.0, 55.5])
    for kind in ("zscore", "minmax", "logminmax", "none"):
        t = Transform.fit(kind, y)
        np.testing.assert_allclose(t.inverse(t(y)), y, rtol=1e-10)
    assert Transform.fit("minmax", y)(y).min() == 0 and Transform.fit("minmax", y)(y).max() == 1


def test_networks_recovered_from_the_model_above_chance_and_raw_signal(cohort, tmp_path):
    metrics, stdout = brainlm(
        "networks",
        "--model",
        str(cohort["model"]),
        "--shards",
        str(cohort["shards"]),
        "--out",
        str(tmp_path / "n"),
    )
    res = metrics["results"]
    best = res[metrics["best_model_feature"]]["accuracy"]
    assert best > metrics["chance_majority"] + 0.2, res
    assert best > res["raw"]["accuracy"] + 0.1, res  # raw time series do not transfer across recordings
    assert res["fc_rows"]["accuracy"] > metrics["chance_majority"] + 0.3, res  # the FC baseline is strong here
    assert set(res) == {"attention", "tokens", "attention_random", "tokens_random", "raw", "fc_rows", "coords"}
    assert "unassigned" in metrics["left_out"]
    adds = metrics["pretraining_adds"]["tokens"]  # the trained tokens against the same tokens with random weights
    assert adds["margin"] == pytest.approx(res["tokens"]["accuracy"] - res["tokens_random"]["accuracy"], abs=1e-9)
    assert metrics["recordings"]["reference"] > 0 and metrics["recordings"]["query"] > 0
    assert (tmp_path / "n" / "confusion_tokens.png").exists() and "winner" in stdout


def test_fingerprinting_identifies_subjects_above_chance_beside_fc_and_the_random_weights_control(cohort, tmp_path):
    metrics, stdout = brainlm(
        "fingerprint", "--model", str(cohort["model"]), "--shards", str(cohort["shards"]), "--out", str(tmp_path / "f"),
        "--label", "condition",
    )  # fmt: skip
    acc = metrics["fingerprinting"]
    assert metrics["recordings"] == 20 and metrics["queries"] == 20 and metrics["chance"] == pytest.approx(1 / 19)
    assert max(acc.values()) > 3 * metrics["chance"], acc  # the synthetic subjects are told apart from their scans
    assert {"cls", "latent_fc", "cls_random", "latent_fc_random", "fc", "fc_uncentred"} <= set(acc)
    # The control is the same model with fresh parameters: buffers (prior, scaling, encodings) kept, the model intact.
    from brainlm.eval.common import random_weights
    from brainlm.model import BrainLM

    trained = BrainLM.from_pretrained(cohort["model"])
    control = random_weights(trained)
    fresh = dict(control.named_parameters())
    assert all(not torch.equal(p, fresh[n]) for n, p in trained.named_parameters() if p.numel() > 1)
    assert all(torch.equal(b, dict(control.named_buffers())[n]) for n, b in trained.named_buffers())
    pairs = {(c["a"], c["b"]) for c in metrics["fingerprinting_comparisons"]}
    assert ("latent_fc", "fc") in pairs and ("latent_fc", "latent_fc_random") in pairs
    decoding = metrics["decoding"]["balanced_accuracy"]
    assert metrics["decoding"]["classes"] == ["rest", "task"] and all(0 <= v <= 1 for v in decoding.values())
    assert decoding["fc"] >= 0.7, decoding  # task runs drive the visual network: FC sees the condition (chance 0.5)
    assert "latent_fc vs latent_fc_random" in stdout
    proc = run_cli(
        "-m", "brainlm.cli", "fingerprint", "--model", str(cohort["model"]), "--shards", str(cohort["shards"]),
        "--out", str(tmp_path / "g"), "--split", "val", "--label", "nothing",
    )  # fmt: skip
    assert proc.returncode == 2 and "--label 'nothing'" in proc.stderr, proc.stderr[-2000:]


def test_knn_across_recordings_uses_only_reference_recordings_and_training_parcels():
    from brainlm.eval.networks import folds, knn_across_recordings, reference_mask

    rng = np.random.default_rng(0)
    labels = np.array(["a"] * 10 + ["b"] * 10)
    reference = reference_mask(6)
    feats = rng.standard_normal((6, 20, 4))
    # the query recordings carry a perfect label code; the reference ones only noise: nothing to learn from
    feats[~reference, :, 0] = np.where(labels == "a", 10.0, -10.0)
    splits = folds(labels, 5)
    pred = knn_across_recordings(feats, labels, splits, reference, k=3)
    assert pred.shape == (3, 20)
    assert abs(np.mean(pred == labels) - 0.5) < 0.3  # no leak from the query recordings' own features
    feats[reference, :, 0] = np.where(labels == "a", 10.0, -10.0)  # now the reference carries it too
    assert np.mean(knn_across_recordings(feats, labels, splits, reference, k=3) == labels) == 1.0


def test_cross_validation_never_tests_a_parcel_it_trained_on():
    from brainlm.eval.networks import folds

    labels = np.array(["a"] * 7 + ["b"] * 9 + ["c"] * 5)
    tested = []
    for train, test in folds(labels, 5):
        assert not set(train) & set(test)
        tested += list(test)
    assert sorted(tested) == list(range(len(labels)))


def test_perturbation_moves_the_embedding_and_sparsity_shrinks_it(cohort, tmp_path):
    common = [
        "--model",
        str(cohort["model"]),
        "--shards",
        str(cohort["shards"]),
        "--steps",
        "60",
        "--source",
        "condition=rest",
        "--target",
        "condition=task",
        "--max-windows",
        "32",
    ]
    loose, stdout = brainlm("perturb", *common, "--l1", "0.0", "--out", str(tmp_path / "a"))
    sparse, _ = brainlm("perturb", *common, "--l1", "5.0", "--out", str(tmp_path / "b"))
    assert loose["reached"] > 0.3 and loose["distance_after"] < loose["distance_before"]
    assert sparse["mean_abs_theta"] < loose["mean_abs_theta"]
    assert len(loose["magnitude"]) == 60 and len(loose["model"]["top_parcels"]) == 6
    assert "Visual" in loose["model"]["top_share"] and "Visual" in loose["baseline_variance"]["top_share"]
    # ground truth: the task drives the visual parcels only, so the perturbation concentrates there
    visual, base = loose["model"]["top_share"]["Visual"], loose["model"]["base_rate"]["Visual"]
    assert visual >= 2 * base, (visual, base, loose["model"]["top_networks"])
    assert (tmp_path / "a" / "perturbation_brain.png").exists() and "moved" in stdout


def test_attention_maps_per_condition(cohort, tmp_path):
    metrics, _ = brainlm(
        "attention",
        "--model",
        str(cohort["model"]),
        "--shards",
        str(cohort["shards"]),
        "--out",
        str(tmp_path / "t"),
        "--group-by",
        "condition",
    )
    assert set(metrics["groups"]) == {"rest", "task"}
    for group in metrics["groups"].values():
        a = np.array(group["attention"])
        assert a.shape == (60,) and (a >= 0).all() and a.sum() <= 1 + 1e-5
    assert metrics["difference"]["of"] == "task - rest"
    assert (tmp_path / "t" / "attention_condition-task.png").exists()


def test_bad_inputs_get_clear_errors(cohort, tiny_shards, tmp_path):
    from brainlm.eval.common import load_context, split_windows
    from brainlm.eval.finetune import FinetuneConfig, finetune
    from brainlm.model import BrainLM, get_preset, prior

    with_table = tmp_path / "table-model"
    BrainLM(get_preset("debug", num_parcels=60, learned_parcel_embedding=True)).save_pretrained(with_table)
    with pytest.raises(DimensionError, match=r"trained on 60 parcels with a learned per-parcel table .* have 7"):
        load_context(str(with_table), str(tiny_shards))
    # A model that places parcels by their coordinates only runs on another atlas (transfer).
    assert load_context(str(cohort["model"]), str(tiny_shards)).coords_R3.shape == (7, 3)
    # There the decoder's Gaussian prior is refitted on the shards' training windows, as the baselines are.
    with_prior = tmp_path / "prior-model"
    model = BrainLM(get_preset("debug", num_parcels=60, num_timepoints=40, decoder_prior="gaussian"))
    model.fit_prior(torch.randn(8, 60, model.config.num_timepoints), torch.randn(60, 3))
    model.save_pretrained(with_prior)
    ctx = load_context(str(with_prior), str(tiny_shards))
    mu, cov = prior.fit(split_windows(ctx, "train", prior.FIT_WINDOWS)[0])
    assert ctx.model.prior_fits(ctx.coords_R3) and torch.allclose(ctx.model.prior_cov_RR.double(), cov, atol=1e-5)
    assert torch.allclose(ctx.model.prior_mu_R.double(), mu, atol=1e-5)
    with pytest.raises(InputError, match="'shoe_size' is not a phenotype of these shards; columns: age"):
        finetune(str(cohort["model"]), str(cohort["shards"]), tmp_path, FinetuneConfig(target="shoe_size"))
    with pytest.raises(InputError, match="labelled training subjects"):
        finetune(str(cohort["model"]), str(cohort["shards"]), tmp_path, FinetuneConfig(target="age", min_subjects=100))
    proc = run_cli(
        "-m",
        "brainlm.cli",
        "reconstruct",
        "--model",
        str(tmp_path / "nope"),
        "--shards",
        str(cohort["shards"]),
        "--out",
        str(tmp_path / "x"),
    )
    assert proc.returncode == 2 and "expected an exported model folder" in proc.stderr
    no_val = tmp_path / "noval"
    assert (
        run_cli(
            "-m",
            "data_prep",
            "build",
            "--inputs",
            str(cohort["root"] / "cohort"),
            "--out",
            str(no_val),
            "--val-frac",
            "0",
            "--test-frac",
            "0.2",
            "--quiet",
        ).returncode
        == 0
    )
    with pytest.raises(InputError, match=r"the 'val' split .* is empty"):
        finetune(str(cohort["model"]), str(no_val), tmp_path, FinetuneConfig(target="age"))


def test_cli_help_lists_every_command(tiny_shards):
    """One front door: the analyses, and the build, pretraining and sweeps through their own parsers."""
    proc = run_cli("-m", "brainlm.cli", "--help")
    for command in ("data", "pretrain", "tune", "reconstruct", "embed", "finetune", "networks", "perturb", "attention"):
        assert command in proc.stdout
    assert "Dropout before each head layer" in run_cli("-m", "brainlm.cli", "finetune", "--help").stdout
    assert "usage: brainlm data build" in run_cli("-m", "brainlm.cli", "data", "build", "--help").stdout
    assert "usage: brainlm tune finetune" in run_cli("-m", "brainlm.cli", "tune", "finetune", "--help").stdout
    assert "--train.select" in run_cli("-m", "brainlm.cli", "pretrain", "--help").stdout
    inspect = run_cli("-m", "brainlm.cli", "data", "inspect", str(tiny_shards))
    assert inspect.returncode == 0 and "all 5 shard checksums match" in inspect.stdout, inspect.stderr[-2000:]
    missing = run_cli("-m", "brainlm.cli", "data", "inspect", str(tiny_shards.parent / "nowhere"))
    assert missing.returncode == 2 and missing.stderr.startswith("error:"), missing.stderr[-2000:]
