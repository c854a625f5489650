"""The Python API a lab uses from a notebook: load, embed and reconstruct its own recordings (numpy, NIfTI), the
scikit-learn embedder, the MLflow pyfunc, and a lean install. Against a model exported by a short pretraining."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from brainlm.exceptions import InputError, TRMismatchError
from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A synthetic cohort (with NIfTI volumes), its shards, and a debug model pretrained 60 steps and registered."""
    root = tmp_path_factory.mktemp("api")
    synth = run_cli(
        "-m", "data_prep", "synth", "--out", str(root / "cohort"), "--subjects", "10", "--timepoints", "240",
        "--parcels", "30", "--nifti",
    )  # fmt: skip
    assert synth.returncode == 0, synth.stderr
    # No --kind: the folder has NIfTI volumes too, and its recordings.tsv says the arrays are the recordings.
    build = run_cli(
        "-m", "data_prep", "build", "--inputs", str(root / "cohort"), "--out", str(root / "shards"), "--quiet",
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    uri = f"sqlite:///{root / 'mlflow.db'}"
    train = run_cli(
        "launcher/pretrain.py", "--config", "configs/pretrain/debug.yaml", "--data.shards", str(root / "shards"),
        "--train.out_dir", str(root / "run"), "--train.max_steps", "60", "--train.log_every", "30",
        "--train.val_every", "0", "--train.ckpt_every", "0", "--data.num_workers", "0",
        "--tracking.tracking_uri", uri, "--tracking.register_as", "brainlm-api",
    )  # fmt: skip
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-2000:]
    recordings = sorted((root / "cohort" / "recordings").glob("sub-*.npy"))
    return {
        "root": root,
        "model": root / "run" / "model",
        "uri": uri,
        "recordings": recordings,
        "shards": root / "shards",
    }


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Use a pretrained model") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs(trained, tmp_path):
    """The README's notebook example, verbatim but for the model URI's registry and the file it reads."""
    raw_RT = np.load(trained["recordings"][0])
    np.save(tmp_path / "sub-01_task-rest_bold.npy", raw_RT.T)  # the example reads [time, parcels]
    code = readme_example().replace("models:/brainlm-debug@current", "models:/brainlm-api@current")
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": trained["uri"], "BRAINLM_CACHE": str(tmp_path / "cache")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    D, R = 32, 30
    assert f"({D},) ({R * (R - 1) // 2},) masked R^2" in proc.stdout, proc.stdout


def test_embed_applies_the_training_scaling_and_refuses_another_tr(trained):
    import brainlm
    from brainlm.model.scaling import RobustScaler

    model = brainlm.load(trained["model"], device="cpu")
    raw_RT = np.load(trained["recordings"][0])
    per_window = model.embed(raw_RT.T, tr=0.72, average=False)
    # By hand: the model's scaling, then windows of its length, then the CLS embedding.
    scaled = RobustScaler.from_dict(model.scaling).transform(raw_RT)
    W = model.config.num_timepoints
    windows = torch.from_numpy(np.stack([scaled[:, s : s + W] for s in range(0, raw_RT.shape[1] - W + 1, W)]))
    coords = torch.tensor(model.extra["atlas"]["coords_mm"])
    with torch.no_grad():
        manual = model.encode(windows, coords)[0].numpy()
    np.testing.assert_allclose(per_window, manual, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.embed(raw_RT, layout="RT"), manual.mean(axis=0), rtol=1e-5, atol=1e-5)
    assert np.array_equal(model.embed(raw_RT.T), model.embed(raw_RT.T))  # deterministic
    with pytest.raises(TRMismatchError, match=r"TR is 2 s but the model was trained at TR 0.72 s.*resample=True"):
        model.embed(raw_RT.T, tr=2.0)
    slow = raw_RT[:, ::2]  # the same signal at TR 1.44 s, resampled back for the model
    assert model.embed(slow.T, tr=1.44, resample=True).shape == (32,)
    rec = model.reconstruct(raw_RT.T, tr=0.72, mask_ratio=0.5, seed=1)
    assert rec.mask_WRT.mean() == pytest.approx(0.5) and np.isfinite(rec.r2)
    with pytest.raises(Exception, match="no axis of 30 parcels"):
        model.embed(raw_RT[:20].T)
    # One Preprocessing value is the same as its fields given as keywords; a wrong option says which ones exist.
    pre = brainlm.Preprocessing(tr=0.72, layout="RT", stride=W // 2)
    np.testing.assert_array_equal(
        model.embed(raw_RT, preprocessing=pre), model.embed(raw_RT, tr=0.72, layout="RT", stride=W // 2)
    )
    assert not np.allclose(model.embed(raw_RT, preprocessing=pre), manual.mean(axis=0))  # the stride was applied
    with pytest.raises(TypeError, match=r"argument\(s\) strid: .*preprocessing options are tr, layout, stride"):
        model.embed(raw_RT, strid=5)
    with pytest.raises(InputError, match="stride must be a whole number"):
        model.embed(raw_RT, stride=2.5)
    with pytest.raises(InputError, match="not both"):
        model.embed(raw_RT, preprocessing=pre, tr=0.72)
    with pytest.raises(InputError, match="layout must be one of auto, TR, RT; got 'tr'"):
        brainlm.Preprocessing(layout="tr")


def test_the_embedder_works_in_a_scikit_learn_pipeline(trained):
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline

    import brainlm

    model = brainlm.load(trained["model"], device="cpu")
    recordings = [np.load(p).T for p in trained["recordings"]]
    y = np.arange(len(recordings), dtype=float)
    pipe = make_pipeline(brainlm.BrainLMEmbedder(model, pooling="latent_fc", tr=0.72), Ridge(alpha=1.0))
    pipe.fit(recordings, y)
    assert pipe.predict(recordings[:3]).shape == (3,)
    assert pipe.named_steps["brainlmembedder"].get_params()["pooling"] == "latent_fc"
    # The estimator contract (scikit-learn's clone, cross-validation): parameters kept as given, fitted state apart.
    from sklearn.base import clone
    from sklearn.model_selection import cross_val_score
    from sklearn.utils.validation import check_is_fitted

    by_path = brainlm.BrainLMEmbedder(str(trained["model"]), pooling="cls", tr=0.72)
    assert clone(by_path).get_params()["model"] == str(trained["model"])
    by_path.fit(recordings)
    check_is_fitted(by_path)
    assert by_path.model == str(trained["model"]) and clone(by_path).get_params() == by_path.get_params()
    scores = cross_val_score(make_pipeline(clone(by_path), Ridge(alpha=1.0)), recordings, y, cv=2)
    assert len(scores) == 2


def test_the_registered_pyfunc_predicts_from_a_raw_recording(trained, tmp_path, monkeypatch):
    import mlflow

    import brainlm

    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained["uri"])
    monkeypatch.setenv("BRAINLM_CACHE", str(tmp_path))
    mlflow.set_tracking_uri(trained["uri"])
    served = mlflow.pyfunc.load_model("models:/brainlm-api@current")
    raw_TR = np.load(trained["recordings"][0]).T.astype(np.float32)
    out = served.predict(raw_TR[None])
    model = brainlm.load("models:/brainlm-api@current", device="cpu")
    np.testing.assert_allclose(out[0], model.embed(raw_TR), rtol=1e-4, atol=1e-5)
    assert served.metadata.get_input_schema() is not None  # a signature and an input example were logged
    requirements = Path(mlflow.pyfunc.get_model_dependencies("models:/brainlm-api@current")).read_text()
    # Requirements any index resolves: public versions (no +cpu build label), not brainlm (not on PyPI: its code
    # travels with the model, on the path when MLflow loads it).
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements and "numpy==" in requirements, requirements
    assert "+" not in requirements and "brainlm" not in requirements, requirements
    local = Path(mlflow.artifacts.download_artifacts("models:/brainlm-api@current", dst_path=str(tmp_path / "dl")))
    assert (local / "code" / "brainlm" / "model" / "mae.py").exists()
    lines = [r.strip() for r in requirements.splitlines() if r.strip() and not r.startswith("mlflow")]
    dry = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps", "-q", *lines],
        capture_output=True, text=True,
    )  # fmt: skip
    assert dry.returncode == 0, dry.stderr[-2000:]  # every pinned requirement resolves from the package index


def test_embed_cli_reads_nifti_with_the_models_atlas(trained, tmp_path):
    cohort = trained["root"] / "cohort"
    proc = run_cli(
        "-m", "brainlm.cli", "embed", "--model", str(trained["model"]), "--inputs", str(cohort / "bids"),
        "--atlas", str(cohort / "atlas_dseg.nii.gz"), "--atlas-table", str(cohort / "atlas.tsv"),
        "--out", str(tmp_path / "emb"), "--device", "cpu",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = np.load(tmp_path / "emb" / "embeddings.npz")
    tsv = (tmp_path / "emb" / "embeddings.tsv").read_text().splitlines()
    assert saved["values"].shape == (len(saved["ids"]), 32) and len(tsv) == len(saved["ids"]) + 1
    assert tsv[0].split("\t")[:2] == ["id", "subject"] and "sub-" in saved["ids"][0]


@pytest.mark.skipif(os.environ.get("BRAINLM_SKIP_INSTALL_TEST") == "1", reason="BRAINLM_SKIP_INSTALL_TEST=1")
def test_a_plain_install_loads_and_embeds_without_the_infrastructure(trained, tmp_path):
    """pip install . into a fresh venv (no extras): the model and inference work; no DeepSpeed, Ray, MLflow or
    boto3 is installed. Then the [data] extra alone: every analysis runs on a model folder."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    done = subprocess.run([*pip, str(ROOT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    installed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list", "--format", "json"], capture_output=True, text=True
    ).stdout
    names = {p["name"].lower() for p in json.loads(installed)}
    assert not names & {"deepspeed", "ray", "mlflow", "boto3", "webdataset"}, names
    code = textwrap.dedent(
        f"""
        import sys, numpy as np, brainlm
        model = brainlm.load({str(trained["model"])!r})
        x = np.load({str(trained["recordings"][0])!r}).T
        print(model.embed(x, tr=0.72).shape)
        print(sorted({{"deepspeed", "ray", "mlflow", "boto3"}} & {{m.split(".")[0] for m in sys.modules}}))
        """
    )
    run = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split("\n")[:2] == ["(32,)", "[]"], run.stdout
    # Building shards needs the [data] extra: said before any work, with the command to run.
    cohort = trained["root"] / "cohort"
    build = [str(venv / "bin" / "python"), "-m", "data_prep", "build", "--inputs", str(cohort), "--out", str(tmp_path)]
    proc = subprocess.run(build, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "pip install 'brainlm[data]'" in proc.stderr, proc.stderr[-2000:]
    # The [data] extra alone runs every analysis on a model folder: the training stack is not needed for them.
    done = subprocess.run([*pip, f"{ROOT}[data]"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    installed = subprocess.run([*pip[:-2], "list", "--format", "json"], capture_output=True, text=True).stdout
    assert not {p["name"].lower() for p in json.loads(installed)} & {"deepspeed", "ray", "mlflow", "boto3"}
    io = ["--model", str(trained["model"]), "--shards", str(trained["shards"]), "--device", "cpu"]
    for command in (
        ["reconstruct", "--masking", "random", "--limit", "8"],
        ["embed", "--splits", "test"],
        ["finetune", "--target", "age", "--seeds", "1", "--epochs", "1", "--freeze"],
        ["attention", "--max-windows", "16"],
        ["perturb", "--steps", "2", "--max-windows", "8", "--split", "train"],
    ):
        out = tmp_path / command[0]
        proc = subprocess.run(
            [str(venv / "bin" / "brainlm"), *command, *io, "--out", str(out)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert proc.returncode == 0, f"{command[0]}: " + proc.stderr[-3000:]
        assert (out / "metrics.json").exists()


def test_bad_input_is_refused_with_what_to_do_and_a_loaded_model_is_accepted(trained, tmp_path):
    import brainlm

    model = brainlm.load(trained["model"], device="cpu")
    raw_TR = np.load(trained["recordings"][0]).T.copy()
    raw_TR[10, 3] = np.nan
    with pytest.raises(InputError, match=r"1 non-finite value.*parcel 3 at timepoint 10"):
        model.embed(raw_TR)
    # A folder of arrays: the recording with a NaN is skipped with its reason, the other one embedded.
    folder = tmp_path / "arrays"
    folder.mkdir()
    np.save(folder / "sub-01_task-rest_bold.npy", raw_TR.T)
    np.save(folder / "sub-02_task-rest_bold.npy", np.load(trained["recordings"][1]))
    table = brainlm.embed_files(model, folder)
    assert len(table.ids) == 1
    assert len(table.skipped) == 1 and "non-finite" in table.skipped[0]["reason"]
    # The model's parcels in another order: the parcel count matches, the centres do not.
    atlas = (trained["root"] / "cohort" / "atlas.tsv").read_text().splitlines()
    (tmp_path / "reversed.tsv").write_text("\n".join([atlas[0], *atlas[:0:-1]]) + "\n")
    with pytest.raises(InputError, match=r"centres lie .* mm from the model's"):
        brainlm.embed_files(model, folder, atlas_table=tmp_path / "reversed.tsv")
    shards = str(trained["shards"])
    with pytest.raises(InputError, match=r"among random, tube, parcel, future; got randm"):
        brainlm.reconstruct(model, shards, tmp_path / "r", strategies=("randm",))
    with pytest.raises(InputError, match=r"no split 'tset'.*its splits are test, train, val"):
        brainlm.reconstruct(model, shards, tmp_path / "r", split="tset", strategies=("random",))
    with pytest.raises(InputError, match=r"--group-by 'conditon'.*expected one of .*condition"):
        brainlm.attention(model, shards, tmp_path / "a", group_by="conditon")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match=r"sees no CUDA GPU.*--device cpu"):
            brainlm.load(trained["model"], device="cuda")
    # An analysis takes the model already loaded, and leaves it as it was.
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = brainlm.reconstruct(model, shards, tmp_path / "r", strategies=("random",), limit=4)
    assert metrics["model"] == "a model given in memory" and np.isfinite(metrics["pooled_r2"]["random"]["model"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
