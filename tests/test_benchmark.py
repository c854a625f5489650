"""``brainlm benchmark`` end to end on a tiny cohort: subject folds built, trained and evaluated, the folds pooled
with intervals, a killed or repeated run resumed, a changed one refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, make_signal, run_cli, write_atlas_table

pytestmark = pytest.mark.slow

TRAIN = [
    "--config", "configs/pretrain/debug.yaml", "--model.num_timepoints", "40", "--train.max_steps", "4",
    "--train.micro_batch_size", "4", "--train.log_every", "2", "--train.val_every", "2", "--train.ckpt_every", "0",
    "--data.num_workers", "0",
]  # fmt: skip


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench") / "cohort"
    root.mkdir()
    write_atlas_table(root / "atlas.tsv")
    rng = np.random.default_rng(5)
    for s in range(1, 7):
        np.save(root / f"sub-{s:02d}_task-rest_run-1_bold.npy", make_signal(rng, 7, 160))
    return root


def bench(cohort: Path, out: Path, *args: str):
    return run_cli(
        "-m", "brainlm.cli", "benchmark", "--inputs", str(cohort), "--out", str(out), "--folds", "3",
        "--build-args=--crop 40 --stride 40 --tr 0.8", "--device", "cpu", *args,
    )  # fmt: skip


def test_benchmark_tests_every_subject_once_on_models_that_never_saw_them(cohort, tmp_path):
    out = tmp_path / "b"
    proc = bench(cohort, out, "--contexts", "0,all", *TRAIN)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    tested = []
    for i, fold in enumerate(summary["folds"]):
        manifest = json.loads((out / f"fold-{i}" / "shards" / "manifest.json").read_text())
        splits = {s: set(manifest["splits"][s]["subjects"]) for s in ("train", "val", "test")}
        # The fold's test subjects are the ones the manifest tests, and never in its training or validation.
        assert splits["test"] == set(fold["test"]) and not splits["test"] & (splits["train"] | splits["val"])
        assert splits["val"] == set(fold["val"]) and len(fold["val"]) == 1
        # The model of the fold was trained on that shard set (its training subjects only).
        extra = json.loads((out / f"fold-{i}" / "run" / "model" / "extra.json").read_text())
        assert extra["trained_on"][-1]["manifest_sha256"] == manifest["plan_sha256"]
        tested += fold["test"]
    assert sorted(tested) == [f"{s:02d}" for s in range(1, 7)]
    assert {"ridge+ctx", "adaptive+ctx"} <= set(summary["results"]["0.5/ctx-all/random"]["pooled_r2"])
    assert "ridge+ctx" not in summary["results"]["0.5/random"]["pooled_r2"]  # context 0: none given
    for key in ("0.5/random", "0.5/parcel"):
        r = summary["results"][key]
        c = r["model_vs_best"]
        assert r["subjects"] == 6 and len(r["per_fold_margin"]) == 3 and set(c["per_subject"]) == set(tested)
        lo, hi = c["interval_subjects"]
        assert lo <= c["margin"] <= hi and c["winner"] in ("model", "tie", r["best_baseline"])
        assert c["winner"] == "tie" or lo > 0 or hi < 0
    assert "| 0.5 | random |" in (out / "summary.md").read_text()
    # A re-run resumes: nothing is built, trained or evaluated again, and the report is the same.
    mtime = (out / "fold-1" / "run" / "model" / "model.safetensors").stat().st_mtime
    again = bench(cohort, out, "--contexts", "0,all", *TRAIN)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "fold-1" / "run" / "model" / "model.safetensors").stat().st_mtime == mtime
    assert json.loads((out / "summary.json").read_text())["results"] == summary["results"]
    # Other folds into the same folder are refused: the folds on disk would not be the ones asked for.
    other = bench(cohort, out, *TRAIN, "--seed", "1")
    assert other.returncode == 2 and "other settings (seed: 0 there, 1 now)" in other.stderr
    # So is the same recipe path with other contents: its folds were trained on the recipe as it was.
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((ROOT / "configs" / "pretrain" / "debug.yaml").read_text())
    args = [*TRAIN[2:], "--stage", "build"]
    assert bench(cohort, tmp_path / "r", "--config", str(recipe), *args).returncode == 0
    recipe.write_text(recipe.read_text().replace("mask_ratio: 0.5", "mask_ratio: 0.75"))
    edited = bench(cohort, tmp_path / "r", "--config", str(recipe), *args)
    assert edited.returncode == 2 and "other settings (recipe_sha256:" in edited.stderr, edited.stderr[-2000:]
    # One given model on every fold (transfer): nothing is trained, each fold's test subjects are evaluated.
    model = out / "fold-0" / "run" / "model"
    given = bench(cohort, tmp_path / "t", "--model", str(model), "--masking", "random")
    assert given.returncode == 0, given.stderr[-3000:]
    t = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert not (tmp_path / "t" / "fold-0" / "run").exists() and t["results"]["0.5/ctx-all/random"]["subjects"] == 6
    # A benchmark stopped early reports the folds it evaluated, and says which are missing.
    (tmp_path / "t" / "fold-2" / "eval-0.5-ctx-all" / "metrics.json").unlink()
    part = bench(cohort, tmp_path / "t", "--model", str(model), "--masking", "random", "--stage", "report")
    assert part.returncode == 0, part.stderr[-3000:]
    assert not (tmp_path / "t" / "fold-2" / "eval-0.5-ctx-all" / "metrics.json").exists()  # nothing evaluated
    p = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert [f["index"] for f in p["folds"]] == [0, 1] and p["folds_total"] == 3
    assert p["results"]["0.5/ctx-all/random"]["subjects"] == 4 and "partial: 1 of 3 folds" in part.stdout


def test_a_recipe_that_validates_on_test_subjects_is_refused():
    proc = run_cli("launcher/pretrain.py", "--config", "configs/pretrain/debug.yaml", "--data.val_split", "test")
    assert proc.returncode == 2 and "validation must be subjects of its own" in proc.stderr
