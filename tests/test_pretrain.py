"""Pretraining with real processes: the deepspeed launcher on CPU (gloo), ZeRO stages, resume after a kill,
S3 shards, MLflow tracking and registry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from brainlm.exceptions import ConfigError
from brainlm.training.ds_config import resolve_ds_config
from brainlm.training.recipe import build_recipe, load_recipe, parse_overrides
from tests.conftest import ROOT, build_tiny, free_port, run_cli

pytestmark = pytest.mark.slow

# A constant learning rate (no warmup, cosine from 1 to 1), so runs of different lengths share a schedule.
COMMON = [
    "--model.num_timepoints",
    "40",
    "--optim.warmup_fraction",
    "0",
    "--optim.min_lr_ratio",
    "1",
    "--optim.lr",
    "0.003",
    "--train.log_every",
    "1",
    "--train.val_every",
    "0",
    "--train.val_samples",
    "8",
]
VENV_BIN = str(Path(sys.executable).parent)


def ds_config(tmp_path: Path, stage: int) -> Path:
    cfg = json.loads((ROOT / "ds_config.json").read_text())
    cfg["zero_optimization"] = {"stage": stage}
    path = tmp_path / f"ds_zero{stage}.json"
    path.write_text(json.dumps(cfg))
    return path


def deepspeed_cmd(args: list[str], ranks: int = 2, ds: Path | None = None) -> list[str]:
    return [
        f"{VENV_BIN}/deepspeed",
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(free_port()),
        "launcher/pretrain.py",
        "--deepspeed",
        str(ds or "ds_config.json"),
        *COMMON,
        *args,
    ]


def run(cmd: list[str], timeout: int | None = None, **env) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", **env},
    )
    return proc


def losses(out_dir: Path) -> dict[int, float]:
    """Loss per step from metrics.jsonl (a resumed run's later lines win)."""
    out = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            out[row["step"]] = row["loss"]
    return out


def assert_same(a: dict[int, float], b: dict[int, float], steps: range, rtol: float = 1e-5) -> None:
    for s in steps:
        assert a[s] == pytest.approx(b[s], rel=rtol), f"step {s}: {a[s]} != {b[s]}"


@pytest.fixture(scope="module")
def baseline(tiny_shards, tmp_path_factory) -> Path:
    """2 ranks, ZeRO-1, through the deepspeed launcher: the reference run of this module."""
    out = tmp_path_factory.mktemp("runs") / "baseline"
    proc = run(
        deepspeed_cmd(
            [
                "--data.shards",
                str(tiny_shards),
                "--train.micro_batch_size",
                "4",
                "--train.max_steps",
                "40",
                "--train.ckpt_every",
                "10",
                "--train.out_dir",
                str(out),
                "--tracking.enabled",
                "false",
            ]
        )
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 rank(s), global batch 8 (4 x 1 x 2)" in proc.stdout
    line = next(x for x in proc.stdout.splitlines() if x.startswith("step     40/40 | loss"))
    for unit in ("lr", "grad_norm", "samples/s", "tokens/s", "data", "mem"):
        assert unit in line
    return out


def test_two_rank_run_learns_checkpoints_and_exports(baseline):
    curve = losses(baseline)
    assert len(curve) == 40
    assert sum(list(curve.values())[-5:]) < sum(list(curve.values())[:5])  # the loss falls
    kept = sorted(p.name for p in (baseline / "checkpoints").glob("step_*"))
    assert kept == ["step_00000020", "step_00000030", "step_00000040"]  # keep_last 3
    assert (baseline / "checkpoints" / "latest").read_text() == "step_00000040"
    assert {"model.safetensors", "config.json", "scaling.json", "extra.json"} <= {
        p.name for p in (baseline / "model").iterdir()
    }


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_zero_stages_give_the_same_losses(stage, baseline, tiny_shards, tmp_path):
    out = tmp_path / f"zero{stage}"
    proc = run(
        deepspeed_cmd(
            [
                "--data.shards",
                str(tiny_shards),
                "--train.micro_batch_size",
                "4",
                "--train.max_steps",
                "10",
                "--train.ckpt_every",
                "0",
                "--train.out_dir",
                str(out),
                "--tracking.enabled",
                "false",
                "--data.num_workers",
                str(stage % 3),
            ],
            ds=ds_config(tmp_path, stage),
        )
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"ZeRO {stage}" in proc.stdout
    assert_same(losses(out), losses(baseline), range(1, 11))
    # the exported weights are whole whatever the sharding
    from brainlm.model import BrainLM

    assert (
        BrainLM.from_pretrained(out / "model").num_params() == BrainLM.from_pretrained(baseline / "model").num_params()
    )


def test_kill_one_rank_and_resume_reproduces_the_loss_curve(baseline, tiny_shards, tmp_path):
    out = tmp_path / "killed"
    args = [
        "--data.shards",
        str(tiny_shards),
        "--train.micro_batch_size",
        "4",
        "--train.max_steps",
        "40",
        "--train.ckpt_every",
        "10",
        "--train.out_dir",
        str(out),
        "--tracking.enabled",
        "false",
        "--train.resume",
        "auto",
    ]
    proc = subprocess.Popen(
        deepspeed_cmd(args),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"},
        start_new_session=True,
    )
    deadline = time.time() + 120
    while not (out / "checkpoints" / "step_00000010").exists():
        assert time.time() < deadline and proc.poll() is None, "no checkpoint appeared"
        time.sleep(0.02)
    victims = [
        p for p in psutil.Process(proc.pid).children(recursive=True) if any("--local_rank=1" in a for a in p.cmdline())
    ]
    assert victims, "rank 1 not found"
    victims[0].send_signal(signal.SIGKILL)
    assert proc.wait(60) != 0
    os.killpg(proc.pid, signal.SIGKILL) if psutil.pid_exists(proc.pid) else None
    done = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert done and done[-1] < "step_00000040", f"the run finished before the kill: {done}"
    assert not (out / "model").exists()

    resumed = run(deepspeed_cmd(args))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / done[-1]}" in resumed.stdout
    assert_same(losses(out), losses(baseline), range(1, 41))


def test_one_rank_from_s3_matches_two_ranks_and_round_trips_mlflow(baseline, tiny_shards, s3_bucket, tmp_path):
    url = f"{s3_bucket}/tiny"
    assert run_cli("-m", "data_prep", "push", str(tiny_shards), url).returncode == 0
    out = tmp_path / "one"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run(
        [
            sys.executable,
            "launcher/pretrain.py",
            *COMMON,
            "--data.shards",
            url,
            "--train.micro_batch_size",
            "8",
            "--train.max_steps",
            "10",
            "--train.out_dir",
            str(out),
            "--tracking.tracking_uri",
            uri,
            "--tracking.register_as",
            "brainlm-test",
            "--data.num_workers",
            "2",
        ]
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 rank(s), global batch 8 (8 x 1 x 1)" in proc.stdout
    assert_same(losses(out), losses(baseline), range(1, 11))

    import mlflow

    from brainlm.model import BrainLM
    from brainlm.tracking.registry import resolve_model

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("brainlm-test", "current")
    run_info = client.get_run(version.run_id)
    assert run_info.data.params["recipe.train.micro_batch_size"] == "8"
    assert run_info.data.params["ds.zero_optimization.stage"] == "1"
    assert len(run_info.data.tags["git_sha"]) >= 7
    history = client.get_metric_history(version.run_id, "loss")
    assert [m.step for m in history] == list(range(1, 11))
    assert client.get_metric_history(version.run_id, "val_masked_r2")
    assert version.tags["manifest_sha256"]
    local = resolve_model("models:/brainlm-test@current", cache=tmp_path / "cache")
    by_alias, exported = BrainLM.from_pretrained(local), BrainLM.from_pretrained(out / "model")
    coords = torch.tensor(by_alias.extra["atlas"]["coords_mm"])
    x = torch.randn(3, 7, 40)  # another batch size than training's 8
    assert torch.equal(by_alias.encode(x, coords)[0], exported.encode(x, coords)[0])
    assert by_alias.scaling["formula"] == "(x - median) / iqr"


def test_unreachable_mlflow_warns_and_trains_on(tiny_shards, tmp_path):
    proc = run(
        [
            sys.executable,
            "launcher/pretrain.py",
            *COMMON,
            "--data.shards",
            str(tiny_shards),
            "--train.max_steps",
            "3",
            "--train.out_dir",
            str(tmp_path / "r"),
            "--tracking.tracking_uri",
            f"http://127.0.0.1:{free_port()}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("unreachable") == 1 and "training goes on" in proc.stderr
    assert (tmp_path / "r" / "model" / "model.safetensors").exists()


def test_non_finite_loss_stops_with_a_clear_message(tiny_shards, tmp_path):
    cfg = json.loads((ROOT / "ds_config.json").read_text()) | {"gradient_clipping": 0.0}
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    proc = run(
        [
            sys.executable,
            "launcher/pretrain.py",
            "--deepspeed",
            str(tmp_path / "ds.json"),
            *COMMON,
            "--optim.lr",
            "1e12",
            "--optim.grad_clip",
            "0",
            "--data.shards",
            str(tiny_shards),
            "--train.max_steps",
            "30",
            "--train.out_dir",
            str(tmp_path / "r"),
            "--tracking.enabled",
            "false",
        ]
    )
    assert proc.returncode == 2
    assert "the loss is" in proc.stderr and "stopping" in proc.stderr and "Lower optim.base_lr" in proc.stderr


def test_resume_into_a_different_model_is_refused(baseline, tiny_shards, tmp_path):
    proc = run(
        [
            sys.executable,
            "launcher/pretrain.py",
            *COMMON,
            "--data.shards",
            str(tiny_shards),
            "--train.max_steps",
            "50",
            "--train.out_dir",
            str(baseline),
            "--train.resume",
            "auto",
            "--model.hidden_size",
            "64",
            "--tracking.enabled",
            "false",
        ]
    )
    assert proc.returncode == 2
    assert (
        "written by a different model config" in proc.stderr
        and "model.hidden_size: checkpoint 32 vs now 64" in proc.stderr
    )


def test_init_from_continues_an_exported_model_and_refuses_another_architecture(baseline, tiny_shards, tmp_path):
    """train.init_from: a run started from the baseline's export begins at the baseline's trained loss, not at a
    fresh model's (without the copy it starts at 1.71 against 0.72 trained), and a recipe of another width is
    refused naming the parameters that differ."""
    out = tmp_path / "continued"
    args = ["--data.shards", str(tiny_shards), "--train.micro_batch_size", "4", "--train.max_steps", "3",
            "--train.out_dir", str(out), "--tracking.enabled", "false",
            "--train.init_from", str(baseline / "model")]  # fmt: skip
    proc = run(deepspeed_cmd(args))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fresh, continued = losses(baseline), losses(out)
    trained = sum(fresh[s] for s in range(36, 41)) / 5
    assert fresh[1] - trained > 0.1, fresh  # the baseline learned: there is a gap to start inside
    assert abs(continued[1] - trained) < 0.25 * (fresh[1] - trained), (continued[1], trained, fresh[1])
    wider = run([sys.executable, "launcher/pretrain.py", *COMMON, *args, "--model.hidden_size", "64"])
    assert wider.returncode == 2, wider.stdout[-2000:] + wider.stderr[-2000:]
    assert "its architecture is not the recipe's model" in wider.stderr and "(32,) vs (64,)" in wider.stderr


def test_bad_recipe_keys_and_values_name_the_flag():
    proc = run_cli("launcher/pretrain.py", "--train.max_step", "5")
    assert proc.returncode == 2 and "did you mean `train.max_steps`" in proc.stderr
    with pytest.raises(ConfigError, match=r"`train\.micro_batch_size` expects int"):
        load_recipe(None, ["--train.micro_batch_size", "eight"])
    with pytest.raises(ConfigError, match=r"`model.hidden_size` \(33\) must be divisible by `model.num_heads`"):
        load_recipe(None, ["--model.hidden_size", "33"])
    with pytest.raises(ConfigError, match=r"`train\.select` must be one of last, best, got 'worst'"):
        load_recipe(None, ["--train.select", "worst"])
    with pytest.raises(ConfigError, match="Unknown config key `trian`"):
        build_recipe({"trian": {}})
    for recipe in sorted((ROOT / "configs" / "pretrain").glob("*.yaml")):
        load_recipe(recipe)  # every shipped recipe parses


def test_ds_config_auto_fill_and_conflicts():
    cfg = load_recipe(
        None, parse_overrides(["--train.micro_batch_size=6", "--train.grad_accum=2", "--optim.base_lr=0.001"])
    )
    ds = json.loads((ROOT / "ds_config.json").read_text())
    out = resolve_ds_config(ds, cfg, world_size=4, bf16_available=False)
    assert out["train_micro_batch_size_per_gpu"] == 6 and out["gradient_accumulation_steps"] == 2
    assert out["train_batch_size"] == 48 and out["bf16"]["enabled"] is False
    assert out["optimizer"]["params"]["lr"] == pytest.approx(0.001 * 48 / 256)
    assert out["optimizer"]["params"]["torch_adam"] is True and out["gradient_clipping"] == 1.0
    with pytest.raises(ConfigError, match=r"train_micro_batch_size_per_gpu = 16 but the recipe gives 6"):
        resolve_ds_config(ds | {"train_micro_batch_size_per_gpu": 16}, cfg, 4, False)
    with pytest.raises(ConfigError, match="scheduler"):
        resolve_ds_config(ds | {"scheduler": {"type": "WarmupLR"}}, cfg, 4, False)


# ---------------------------------------------------------------- several shard sets in one run (a mixture)


def test_mixture_schedule_follows_the_weights_and_resumes(tiny_shards, tiny_shards_5):
    """The set of each micro-step is drawn by the weights, the same from any start (a resume, another rank); a
    mixture's batches hold one atlas each, and a loader started at micro-step k continues as the one that ran k."""
    from brainlm.data.loader import MixtureLoader, TrainLoader, mixture_schedule
    from brainlm.data.shardset import ShardSet

    draws = mixture_schedule([3.0, 1.0], 7, 0, 20000)
    assert abs((draws == 0).mean() - 0.75) < 0.015
    np.testing.assert_array_equal(mixture_schedule([3.0, 1.0], 7, 4090, 20), draws[4090:4110])  # across a block
    sets = [ShardSet.open(str(p)) for p in (tiny_shards, tiny_shards_5)]

    def mixture(start: int) -> MixtureLoader:
        return MixtureLoader(
            lambda i, served: TrainLoader(sets[i], "train", 4, 20, seed=11 + i, start=served), [3.0, 1.0], 7, start
        )

    running = mixture(0)
    batches = [next(running) for _ in range(12)]
    parcels = {0: 7, 1: 5}
    assert [b["set"] for b in batches] == draws[:12].tolist()
    assert all(b["signal"].shape[1] == parcels[b["set"]] for b in batches)
    resumed = mixture(9)
    for b in batches[9:]:
        got = next(resumed)
        assert got["set"] == b["set"]
        torch.testing.assert_close(got["signal"], b["signal"])


def test_two_shard_sets_of_different_atlases_train_in_one_run(tiny_shards, tiny_shards_5, tmp_path):
    """2 ranks through the deepspeed launcher on two shard sets (7 and 5 parcels, weights 3:1): each set's samples
    as the schedule drew them, a validation curve per set, an export that records both and reconstructs both, with a
    decoder prior per atlas fitted on that set's training windows (neither refitted by reconstruct)."""
    import brainlm
    from brainlm.data.loader import fixed_samples, mixture_schedule
    from brainlm.data.shardset import ShardSet
    from brainlm.model import prior
    from brainlm.model.inference import prepare
    from brainlm.model.scaling import RobustScaler

    out = tmp_path / "mixture"
    proc = run(
        deepspeed_cmd(
            [
                "--data.shards",
                f"{tiny_shards},{tiny_shards_5}",
                "--data.weights",
                "3,1",
                "--model.decoder_prior",
                "gaussian",
                "--train.micro_batch_size",
                "4",
                "--train.max_steps",
                "16",
                "--train.val_every",
                "8",
                "--train.out_dir",
                str(out),
                "--tracking.enabled",
                "false",
            ]
        )
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (
        "mixture: shards0 (atlas, 7 parcels" in proc.stdout
        and "weight 0.75" in proc.stdout
        and "weight 0.25" in proc.stdout
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "loss" in r][-1]
    drawn = np.bincount(mixture_schedule([3.0, 1.0], 0, 0, 16), minlength=2) * 8  # global batch 8 per micro-step
    assert [last["samples_shards0"], last["samples_shards1"]] == drawn.tolist() and 0 < drawn[1] < drawn[0]
    val = [r for r in rows if "val_masked_r2" in r][-1]
    assert {"val_masked_r2_shards0", "val_masked_r2_shards1"} <= set(val)
    assert val["val_masked_r2"] == pytest.approx((val["val_masked_r2_shards0"] + val["val_masked_r2_shards1"]) / 2)
    extra = json.loads((out / "model" / "extra.json").read_text())
    assert [(r["parcels"], round(r["weight"], 2)) for r in extra["trained_on"]] == [(7, 0.75), (5, 0.25)]
    assert [len(a["atlas"]["coords_mm"]) for a in extra["atlases"]] == [7, 5]
    assert "decoder prior: one per atlas (2)" in proc.stdout
    model = brainlm.load(out / "model")
    for slot, shards in enumerate((tiny_shards, tiny_shards_5)):  # each atlas's prior: its own set's train split
        shard_set = ShardSet.open(str(shards))
        manifest = shard_set.manifest
        windows, _ = fixed_samples(shard_set, "train", prior.FIT_WINDOWS, 40)
        mu, cov = prior.fit(windows)
        coords = torch.tensor(manifest.atlas.coords(), dtype=torch.float32)
        fitted_mu, fitted_cov = model.prior_for(coords)
        assert torch.allclose(fitted_cov.double(), cov, atol=1e-5) and torch.allclose(fitted_mu.double(), mu, atol=1e-5)
        assert torch.equal(fitted_cov, getattr(model, prior.slot_names(slot)[1]))
        # A recording on this atlas is scaled with this atlas's training statistics (the export keeps each).
        raw = np.random.default_rng(slot).standard_normal((manifest.atlas.num_parcels, 60)) * 3 + 1
        prepared, _ = prepare(model, raw, tr=manifest.tr, coords=coords)
        expected = RobustScaler.from_dict(manifest.scaling).transform(raw)
        np.testing.assert_allclose(prepared.signals_RT[0], expected, rtol=1e-5, atol=1e-5)
    for shards in (tiny_shards, tiny_shards_5):
        metrics = brainlm.reconstruct(
            str(out / "model"), str(shards), tmp_path / shards.parent.name, strategies=("random",), limit=8
        )
        assert np.isfinite(metrics["pooled_r2"]["random"]["model"])
        assert "a mixture of the train splits" in metrics["fitted_on"]["model"]["weights"]
        assert metrics["fitted_on"]["model"]["prior"] == f"fitted on the train split of {shards}"  # not refitted


def test_select_best_exports_the_best_validated_weights(tiny_shards, tiny_shards_5, tmp_path):
    """train.select best, on a mixture: the export holds the weights of the validation step with the highest mean of
    the sets' curves (recomputed here from the exported model on the same windows and masks), extra.json says which,
    and a resumed run keeps the best it had."""
    from brainlm.model import BrainLM
    from brainlm.protocol import R2Sums
    from brainlm.training.engine import DistContext
    from brainlm.training.plan import preflight
    from brainlm.training.pretrain import validation_of

    out = tmp_path / "best"
    args = [
        "--data.shards", f"{tiny_shards},{tiny_shards_5}", "--train.select", "best", "--train.micro_batch_size", "4",
        "--optim.lr", "0.02", "--train.val_every", "3", "--train.ckpt_every", "6", "--train.out_dir", str(out),
        "--tracking.enabled", "false",
    ]  # fmt: skip
    proc = run(deepspeed_cmd([*args, "--train.max_steps", "9"], ranks=1))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = run(deepspeed_cmd([*args, "--train.max_steps", "12", "--train.resume", "auto"], ranks=1))
    assert proc.returncode == 0 and "resumed from" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    curve = {r["step"]: r["val_masked_r2"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "val_masked_r2" in r}  # fmt: skip
    assert sorted(curve) == [3, 6, 9, 12]  # here the best was step 6, kept by the first run: the resume path
    selected = json.loads((out / "model" / "extra.json").read_text())["selected"]
    assert (
        selected["step"] == max(curve, key=lambda k: (curve[k], -k))
        and selected["val_masked_r2"] == curve[selected["step"]]
    )
    # The exported weights score what the run measured at that step, on every set's validation windows.
    cfg = load_recipe(None, parse_overrides([*COMMON, *args]))  # what deepspeed_cmd ran
    plan = preflight(cfg, ROOT / "ds_config.json")
    model = BrainLM.from_pretrained(out / "model").eval()
    scores = []
    for shard_set in plan.sets:
        val = validation_of(cfg, plan, shard_set, DistContext(0, 1, 0, torch.device("cpu")))
        sums = R2Sums()
        with torch.no_grad():
            pred = model(val.signal, val.coords_R3, mask_BL=val.masks).pred_BLP
        sums.add(pred, model.patchify(val.signal), val.masks)
        scores.append(sums.r2)
    assert float(np.mean(scores)) == pytest.approx(selected["val_masked_r2"], abs=1e-4)


def test_mixture_weights_are_checked_before_any_work(tiny_shards, tiny_shards_5):
    """data.weights: one positive number per shard set, else a ConfigError naming the sets; the default weighs
    the sets by their training crops."""
    from brainlm.training.plan import preflight

    both = f"{tiny_shards},{tiny_shards_5}"
    window = {"num_timepoints": 40}
    as_list = build_recipe({"data": {"shards": [str(tiny_shards), str(tiny_shards_5)]}, "model": window})  # YAML list
    plan = preflight(as_list, ROOT / "ds_config.json")
    assert [s.weight for s in plan.sets] == [float(s.manifest.num_samples("train")) for s in plan.sets]
    assert plan.num_parcels == 7 and [s.manifest.atlas.num_parcels for s in plan.sets] == [7, 5]
    for weights in ("1", "1,0", "1,x", "1,2,3"):
        with pytest.raises(ConfigError, match="expected 2 positive numbers"):
            preflight(
                build_recipe({"data": {"shards": both, "weights": weights}, "model": window}), ROOT / "ds_config.json"
            )
    with pytest.raises(ConfigError, match="ties the model to one atlas"):
        cfg = build_recipe({"data": {"shards": both}, "model": {**window, "learned_parcel_embedding": True}})
        preflight(cfg, ROOT / "ds_config.json")


def test_a_tr_aware_model_trains_on_two_trs_and_takes_each_as_it_is(tiny_shards, tmp_path):
    """Shard sets at TR 0.8 s and 2 s: refused for a plain model (resample them, or make it TR-aware); with
    model.time_unit_s one run trains on both, the export keeps both TRs, and a recording at either is taken as it is
    (the model reads its TR), at another TR refused, or resampled to the nearest trained one."""
    import brainlm
    from brainlm.data.shardset import ShardSet
    from brainlm.exceptions import ShardError, TRMismatchError
    from brainlm.model.inference import model_trs, prepare
    from brainlm.training.plan import preflight

    (tmp_path / "slow").mkdir()
    build_tiny(tmp_path / "slow", 5, seed=6, tr=2.0)
    slow = tmp_path / "slow" / "shards"
    both = f"{tiny_shards},{slow}"
    with pytest.raises(ShardError, match=r"different TRs .*--resample\), or make the model TR-aware"):
        preflight(build_recipe({"data": {"shards": both}, "model": {"num_timepoints": 40}}), ROOT / "ds_config.json")
    out = tmp_path / "aware"
    args = ["--data.shards", both, "--model.time_unit_s", "0.8", "--train.micro_batch_size", "4"]
    proc = run(deepspeed_cmd([*args, "--train.max_steps", "6", "--train.out_dir", str(out)], ranks=1))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    model = brainlm.load(out / "model")
    assert model_trs(model) == [0.8, 2.0] and model.config.time_unit_s == 0.8
    manifest = ShardSet.open(str(slow)).manifest
    coords = torch.tensor(manifest.atlas.coords(), dtype=torch.float32)
    raw = np.random.default_rng(0).standard_normal((5, 80))
    at = {tr: model.reconstruct(raw, tr=tr, coords=coords, scaling="none", mask_ratio=0.5) for tr in (0.8, 2.0)}
    np.testing.assert_array_equal(at[0.8].signal_WRT, at[2.0].signal_WRT)  # not resampled: the same windows
    assert np.abs(at[0.8].prediction_WRT - at[2.0].prediction_WRT).max() > 1e-4  # read at each TR
    with pytest.raises(TRMismatchError, match=r"TR is 1.2 s but the model was trained at TR 0.8 s or 2 s"):
        prepare(model, raw, tr=1.2, coords=coords, scaling="none")
    prepared, _ = prepare(model, raw, tr=1.2, coords=coords, scaling="none", resample=True)
    assert prepared.tr == 0.8 and prepared.notes == ["resampled from TR 1.2 s to 0.8 s"]
    metrics = brainlm.reconstruct(str(out / "model"), str(slow), tmp_path / "eval", strategies=("random",), limit=8)
    assert np.isfinite(metrics["pooled_r2"]["random"]["model"])
