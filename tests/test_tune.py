"""Ray Tune sweeps end to end on a real local Ray (2 CPUs, loopback only) and a real sqlite MLflow store: a
fine-tuning sweep with a trial that fails, a perturbation sweep, a tiny scaling sweep, an interrupted sweep that
resumes, and search-space files that are wrong."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import psutil
import pytest
import torch

from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow

PRETRAIN = [
    "--model.num_timepoints",
    "40",
    "--optim.warmup_fraction",
    "0",
    "--optim.lr",
    "0.003",
    "--train.log_every",
    "10",
    "--train.val_every",
    "0",
    "--train.val_samples",
    "8",
    "--data.num_workers",
    "0",
]
# lr 1e30 makes the loss non-finite at the first epoch: that trial must fail and the sweep go on.
FINETUNE_SPACE = """
lr: {grid: [1.0e-3, 3.0e-3, 1.0e+30]}
dropout: {uniform: [0.0, 0.5]}
pooling: {choice: [cls, mean]}
head_layers: {randint: [1, 3]}
"""
PERTURB_SPACE = """
l1: {loguniform: [1.0e-3, 1.0]}
lr: {loguniform: [1.0e-2, 1.0e-1]}
steps: {choice: [40, 60]}
form: {choice: [additive, gain_offset]}
"""


@pytest.fixture(scope="module")
def env(tiny_shards, tmp_path_factory, s3_endpoint) -> dict:
    """A pretrained model registered as brainlm-test@current, MLflow, a bucket for Ray's storage, and Ray for the
    module (2 CPUs)."""
    import boto3
    import mlflow

    from brainlm.tuning import SweepOptions, ray_session

    root = tmp_path_factory.mktemp("tune")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    variables = {"MLFLOW_TRACKING_URI": uri, "BRAINLM_CACHE": str(root / "cache"), "RAY_AUTH_MODE": "disabled"}
    proc = run_cli(
        "launcher/pretrain.py",
        *PRETRAIN,
        "--data.shards",
        str(tiny_shards),
        "--train.max_steps",
        "20",
        "--train.out_dir",
        str(root / "pretrain"),
        "--tracking.register_as",
        "brainlm-test",
        env=variables,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    bucket = f"tune-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in variables.items():
            mp.setenv(k, v)
        mlflow.set_tracking_uri(uri)
        with ray_session(SweepOptions(num_cpus=2, storage=f"s3://{bucket}/ray")):  # the workers get S3 settings
            yield {"root": root, "uri": uri, "shards": tiny_shards, "env": variables, "bucket": bucket}


def sweep(env: dict, *args: str) -> int:
    from brainlm.tuning.cli import main

    return main(list(args))


def flags(env: dict, name: str, storage: str | None = None) -> list[str]:
    storage = storage or str(env["root"] / "ray")
    return ["--storage", storage, "--name", name, "--out", str(env["root"] / "sweeps" / name)]


def mlflow_runs(env: dict, name: str):
    """The parent run called ``name`` and its children."""
    import mlflow

    client = mlflow.MlflowClient(env["uri"])
    exp = client.get_experiment_by_name("brainlm-sweeps")
    parents = client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'")
    assert len(parents) == 1, [p.info.run_name for p in parents]
    parent = parents[0]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return client, parent, children


def test_local_ray_listens_on_loopback_only(env):
    import ray

    assert ray.is_initialized() and ray.cluster_resources()["CPU"] == 2
    listening = []
    for p in [psutil.Process(), *psutil.Process().children(recursive=True)]:  # the driver, GCS, raylet, workers
        try:
            listening += [(p.name(), c.laddr) for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    assert any(name in ("gcs_server", "raylet") for name, _ in listening), listening  # the check sees Ray
    exposed = [(n, a) for n, a in listening if a.ip not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    assert not exposed, exposed


@pytest.fixture(scope="module")
def finetuned(env) -> dict:
    space = env["root"] / "finetune.yaml"
    space.write_text(FINETUNE_SPACE)
    t0 = time.time()
    code = sweep(
        env,
        "finetune",
        "--model",
        "models:/brainlm-test@current",
        "--shards",
        str(env["shards"]),
        "--target",
        "age",
        "--epochs",
        "3",
        "--batch-size",
        "8",
        "--space",
        str(space),
        "--samples",
        "1",
        "--reduction-factor",
        "2",
        *flags(env, "ft"),
    )
    assert code == 0
    summary = json.loads((env["root"] / "sweeps" / "ft" / "summary.json").read_text())
    return {"summary": summary, "seconds": time.time() - t0}


def test_finetune_sweep_runs_trials_survives_a_failing_one_and_logs_to_mlflow(env, finetuned):
    summary = finetuned["summary"]
    counts = summary["counts"]
    assert counts["trials"] == 3 and counts["error"] == 1 and counts["finished"] >= 1
    assert counts["finished"] + counts["stopped"] == 2  # which ones ASHA stops varies: not asserted
    failed = [r for r in summary["rows"] if r["outcome"] == "error"]
    assert len(failed) == 1 and failed[0]["lr"] == pytest.approx(1e30)
    md = (env["root"] / "sweeps" / "ft" / "summary.md").read_text()
    assert "NonFiniteLossError" in md and "validation loss is nan" in md

    client, parent, children = mlflow_runs(env, "ft")
    assert parent.info.status == "FINISHED" and parent.data.params["fixed.target"] == "age"
    artifacts = [a.path for a in client.list_artifacts(parent.info.run_id, "summary")]
    assert parent.data.metrics["trials_error"] == 1 and {"summary/summary.md", "summary/trials.png"} <= set(artifacts)
    assert (env["root"] / "sweeps" / "ft" / "trials.png").stat().st_size > 5000  # val_loss per trial over epochs
    assert len(children) == 3
    by_outcome = {c.data.tags["brainlm.outcome"]: c for c in children}
    assert (
        by_outcome["error"].info.status == "FAILED"
        and "NonFiniteLossError" in by_outcome["error"].data.tags["brainlm.error"]
    )
    done = by_outcome["finished"]
    assert [m.step for m in client.get_metric_history(done.info.run_id, "val_loss")] == [1, 2, 3]
    assert done.data.params["target"] == "age" and done.data.params["epochs"] == "3"  # fixed + searched params
    assert "trial/trial.json" in [a.path for a in client.list_artifacts(done.info.run_id, "trial")]


def test_the_best_model_is_registered_as_champion_with_lineage_and_predicts(env, finetuned):
    import mlflow

    from brainlm.data.shardset import ShardSet
    from brainlm.model import BrainLMForPrediction
    from brainlm.tracking.registry import resolve_model

    summary = finetuned["summary"]
    client = mlflow.MlflowClient(env["uri"])
    version = client.get_model_version_by_alias("brainlm-finetuned-age", "champion")
    assert int(version.version) == summary["registered"]["version"]
    manifest = ShardSet.open(str(env["shards"])).manifest
    tags = version.tags
    assert tags["pretrained_model"] == "brainlm-test" and tags["pretrained_version"] == "1"
    assert tags["manifest_sha256"] == manifest.plan_sha256 and tags["trial_id"] == summary["best_trial"]
    run = client.get_run(version.run_id)  # the best trial's child run
    assert run.data.tags["mlflow.parentRunId"] == summary["parent_run_id"]

    folder = resolve_model("models:/brainlm-finetuned-age@champion")
    model = BrainLMForPrediction.from_pretrained(folder)
    coords = torch.tensor(model.backbone.extra["atlas"]["coords_mm"], dtype=torch.float32)
    with torch.no_grad():
        out = model(torch.randn(3, 7, 40), coords)
    assert out.shape == (3, 1) and torch.isfinite(out).all()
    assert model.backbone.extra["finetune"]["target"] == "age" and model.backbone.extra["transform"]["kind"] == "zscore"


def test_perturbation_sweep_scores_trials(env):
    space = env["root"] / "perturb.yaml"
    space.write_text(PERTURB_SPACE)
    code = sweep(
        env,
        "perturb",
        "--model",
        str(env["root"] / "pretrain" / "model"),
        "--shards",
        str(env["shards"]),
        "--source",
        "condition=rest",
        "--target",
        "condition=task",
        "--space",
        str(space),
        "--samples",
        "3",
        "--grace-period",
        "20",
        *flags(env, "pt", f"s3://{env['bucket']}/ray"),  # Ray's storage on S3, as on a cluster
    )
    assert code == 0
    out = env["root"] / "sweeps" / "pt"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["trials"] == 3 and summary["counts"]["error"] == 0 and summary["best_trial"]
    best = next(r for r in summary["rows"] if r["trial"] == summary["best_trial"])
    assert best["score"] == pytest.approx(best["reached"] - max(0.0, best["mean_abs_theta"] - 0.1) / 0.1, abs=1e-6)
    detail = json.loads((out / "best_perturbation.json").read_text())
    assert len(detail["magnitude"]) == 7 and detail["top_parcels"]
    assert "brainlm perturb --model" in summary["rerun"]
    assert (out / "trials.png").stat().st_size > 5000  # score per trial over steps
    import boto3

    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=env["bucket"], Prefix="ray/pt/")["Contents"]]
    assert any(k.endswith("/theta.npy") for k in keys), keys  # checkpoints went to the bucket
    client, parent, children = mlflow_runs(env, "pt")
    assert len(children) == 3 and parent.data.metrics["best_score"] == pytest.approx(best["score"])
    steps = [m.step for m in client.get_metric_history(children[0].info.run_id, "score")]
    assert steps and steps[0] == 20


def test_scaling_sweep_spends_the_budget_and_reports_the_winner(env):
    from brainlm.model import BrainLM
    from brainlm.training.recipe import load_recipe

    budget = 4e8
    code = sweep(
        env,
        "scale",
        "--shards",
        str(env["shards"]),
        "--widths",
        "32",
        "--depths",
        "1,2",
        "--mask-ratios",
        "0.5",
        "--budget",
        str(budget),
        "--val-points",
        "2",
        *flags(env, "sc"),
        "--model.num_timepoints",
        "40",
        "--train.micro_batch_size",
        "4",
        "--train.val_samples",
        "8",
        "--data.num_workers",
        "0",
    )
    assert code == 0
    out = env["root"] / "sweeps" / "sc"
    result = json.loads((out / "scaling.json").read_text())
    assert result["counts"] == {"trials": 2, "finished": 2, "stopped": 0, "error": 0}
    recipe = load_recipe(ROOT / "configs" / "pretrain" / "debug.yaml", ["--model.num_timepoints", "40"])
    for row in result["rows"]:
        cfg = dict(
            hidden_size=32, num_layers=row["depth"], num_heads=1, intermediate_size=64, mask_ratio=0.5, num_parcels=7
        )
        fps = BrainLM(recipe.model.__class__(**{**recipe.model.to_dict(), **cfg})).flops_per_sample(0.5, 7)
        assert row["steps"] == int(budget // (fps * 4)) and row["flops"] <= budget
        assert isinstance(row["val_masked_r2"], float)
    assert len(result["winners"]) == 1 and (out / "scaling.png").stat().st_size > 5000
    assert "wins" in (out / "scaling.md").read_text()
    client, parent, children = mlflow_runs(env, "sc")
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "summary")} >= {
        "summary/scaling.png",
        "summary/scaling.md",
        "summary/scaling.tsv",
        "summary/scaling.json",
    }
    for child in children:
        history = client.get_metric_history(child.info.run_id, "val_masked_r2")
        assert len(history) == 2 and history[-1].step == child.data.metrics["steps"]


def test_an_interrupted_sweep_resumes(env, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("lr: {loguniform: [1.0e-4, 3.0e-3]}\ndropout: {uniform: [0.0, 0.5]}\n")
    args = [
        "finetune",
        "--model",
        "models:/brainlm-test@current",
        "--shards",
        str(env["shards"]),
        "--target",
        "age",
        "--epochs",
        "3",
        "--space",
        str(space),
        "--samples",
        "4",
        "--num-cpus",
        "2",
        *flags(env, "rs"),
    ]
    log = tmp_path / "first.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "launcher/tune.py", *args],
            cwd=ROOT,
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env["env"]},
        )
    try:
        deadline = time.time() + 150
        while "] finished:" not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)  # Ctrl+C: Tune saves the experiment's state and stops
        assert proc.wait(120) == 130, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "--resume --name rs" in log.read_text()

    assert sweep(env, *args, "--resume") == 0
    summary = json.loads((env["root"] / "sweeps" / "rs" / "summary.json").read_text())
    assert summary["counts"]["trials"] == 4 and summary["counts"]["finished"] + summary["counts"]["stopped"] == 4
    _, parent, children = mlflow_runs(env, "rs")  # the same parent run, continued
    assert parent.info.run_id == summary["parent_run_id"] and len(children) == 4


def test_bad_search_spaces_name_the_key(env, tmp_path):
    from brainlm.eval.finetune import FinetuneConfig
    from brainlm.exceptions import ConfigError
    from brainlm.tuning import FINETUNE_FIXED, load_space

    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: {loguniform: [1.0e-4, 1.0e-2]}\n")
    proc = run_cli(
        "-m",
        "brainlm.cli",
        "tune",
        "finetune",
        "--model",
        "m",
        "--shards",
        "s",
        "--target",
        "age",
        "--space",
        str(bad),
        env=env["env"],
    )
    assert proc.returncode == 2
    assert "unknown key `learning_rate`" in proc.stderr and "valid keys (FinetuneConfig fields): " in proc.stderr
    assert "lr, backbone_lr_scale" in proc.stderr  # the valid ones are listed

    base = FinetuneConfig(target="age")
    for text, message in [
        ("dropout: {normal: [0.0, 1.0]}", r"key `dropout`: expected \{uniform"),
        ("lr: {loguniform: [0.0, 1.0]}", r"key `lr`: `loguniform` needs low > 0"),
        ("head_layers: {uniform: [1, 3]}", r"key `head_layers`: `uniform` draws floats but the field takes int"),
        ("pooling: {choice: [cls, max]}", r"key `pooling`: value 'max' is invalid: `--pooling` must be cls or mean"),
        ("epochs: {choice: [5, 10]}", r"key `epochs` cannot be searched: it is ASHA's budget"),
        ("batch_size: 8", r"varies nothing"),
    ]:
        bad.write_text(text + "\n")
        with pytest.raises(ConfigError, match=message):
            load_space(bad, FinetuneConfig, base, FINETUNE_FIXED)
    for shipped in ("finetune", "perturb"):  # the shipped spaces parse
        from brainlm.eval.perturb import PerturbConfig
        from brainlm.tuning import PERTURB_FIXED

        cls, fixed, b = (
            (FinetuneConfig, FINETUNE_FIXED, base)
            if shipped == "finetune"
            else (PerturbConfig, PERTURB_FIXED, PerturbConfig())
        )
        assert load_space(ROOT / "configs" / "tune" / f"{shipped}.yaml", cls, b, fixed)
