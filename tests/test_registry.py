"""The model registry: `brainlm registry list|show|promote|download` in subprocesses against a real sqlite MLflow
store, the pyfunc flavours, lineage of registry URIs, and clear errors for reserved or missing names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def _backbone():
    from brainlm.model import BrainLM, get_preset

    torch.manual_seed(0)
    return BrainLM(get_preset("debug", num_parcels=7, num_timepoints=40))


ATLAS = {
    "name": "tiny",
    "labels": [f"p{i}" for i in range(7)],
    "coords_mm": np.random.default_rng(0).uniform(-60, 60, (7, 3)).round(2).tolist(),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """brainlm-reg (2 versions, alias current -> 2) and brainlm-finetuned-age (a head, z-scored target)."""
    import mlflow

    from brainlm.model import BrainLMForPrediction
    from brainlm.model.heads import Transform
    from brainlm.tracking.registry import log_and_register

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    pretrained = root / "pretrained"
    _backbone().save_pretrained(pretrained, extra={"atlas": ATLAS, "manifest_sha256": "abc123"})
    finetuned = root / "finetuned"
    torch.manual_seed(1)
    transform = Transform("zscore", a=50.0, b=20.0)
    BrainLMForPrediction(_backbone(), 1, dropout=0.1).save_pretrained(
        finetuned, extra={"atlas": ATLAS, "transform": vars(transform), "classes": None}
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        mlflow.create_experiment("registry-test", artifact_location=(root / "artifacts").as_uri())
        mlflow.set_experiment("registry-test")
        for i in range(2):
            with mlflow.start_run(run_name=f"pretrain-{i}"):
                mlflow.log_param("preset", "debug")
                mlflow.log_metric("val_masked_r2", 0.1 * (i + 1), step=10)
                log_and_register(pretrained, "brainlm-reg", "current", {"manifest_sha256": f"sha{i}"})
        with mlflow.start_run(run_name="finetune"):
            log_and_register(
                finetuned,
                "brainlm-finetuned-age",
                "champion",
                {"pretrained_model": "brainlm-reg", "pretrained_version": "2"},
            )
        yield {"uri": uri, "root": root, "finetuned": finetuned, "transform": transform}


def brainlm(store: dict, *args: str):
    return run_cli(
        "-m",
        "brainlm.cli",
        "registry",
        *args,
        env={"MLFLOW_TRACKING_URI": store["uri"], "BRAINLM_CACHE": str(store["root"] / "cache")},
    )


def test_list_show_promote_and_download_through_the_cli(store, tmp_path):
    listed = brainlm(store, "list")
    assert listed.returncode == 0, listed.stderr
    assert f"MLflow store: {store['uri']} (from MLFLOW_TRACKING_URI)" in listed.stderr
    line = next(ln for ln in listed.stdout.splitlines() if ln.startswith("brainlm-reg "))
    assert line.split()[1:3] == ["2", "2"] and "current -> 2" in line
    assert "champion -> 1" in listed.stdout

    shown = brainlm(store, "show", "brainlm-reg", "--alias", "current", "--json")
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert info["version"] == 2 and info["aliases"] == ["current"] and info["tags"]["manifest_sha256"] == "sha1"
    assert info["params"]["preset"] == "debug" and info["metrics"]["val_masked_r2"] == pytest.approx(0.2)

    promoted = brainlm(store, "promote", "brainlm-reg", "1", "current")
    assert promoted.returncode == 0, promoted.stderr
    assert "brainlm-reg@current -> version 1 (was version 2)" in promoted.stdout
    shown = brainlm(store, "show", "brainlm-reg", "--alias", "current")  # the human-readable form
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("brainlm-reg version 1  aliases: current")
    assert "manifest_sha256  sha0" in shown.stdout

    out = tmp_path / "fetched"
    fetched = brainlm(store, "download", "models:/brainlm-finetuned-age@champion", "--out", str(out))
    assert fetched.returncode == 0, fetched.stderr
    assert {"model.safetensors", "config.json", "extra.json", "head.json", "head.safetensors"} <= {
        p.name for p in out.iterdir()
    }


def test_reserved_and_missing_names_are_clear_errors(store, monkeypatch, capsys):
    from brainlm.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    assert main(["registry", "list", "brainlm-reg"]) == 0
    rows = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines() if ln[:1].isdigit()}
    assert set(rows) == {"1", "2"} and "sha1" in rows["2"]
    assert main(["registry", "promote", "brainlm-reg", "1", "latest"]) == 2
    assert "alias 'latest' is reserved by MLflow" in capsys.readouterr().err
    assert main(["registry", "show", "brainlm-reg", "--version", "9"]) == 2
    assert "brainlm-reg has no version 9" in capsys.readouterr().err
    assert main(["registry", "show", "brainlm-reg", "--version", "1", "--alias", "champion"]) == 2
    assert "give --version or --alias, not both" in capsys.readouterr().err
    assert main(["registry", "show", "brainlm-nope"]) == 2
    err = capsys.readouterr().err
    assert "no registered model 'brainlm-nope'" in err and "brainlm-reg" in err  # lists what exists


def test_the_finetuned_pyfunc_predicts_in_target_units(store):
    import mlflow

    from brainlm.model import BrainLMForPrediction
    from brainlm.tracking.registry import lineage, resolve_model

    x = np.random.default_rng(2).standard_normal((3, 7, 40)).astype(np.float32)
    pred = mlflow.pyfunc.load_model("models:/brainlm-finetuned-age@champion").predict(x)
    assert pred.shape == (3, 1) and np.isfinite(pred).all()
    model = BrainLMForPrediction.from_pretrained(
        resolve_model("models:/brainlm-finetuned-age@champion", cache=store["root"] / "c2")
    )
    with torch.no_grad():
        raw = model(torch.from_numpy(x), torch.tensor(ATLAS["coords_mm"], dtype=torch.float32)).numpy()
    assert np.allclose(pred, store["transform"].inverse(raw.astype(np.float64)), atol=1e-5)  # back in years
    embed = mlflow.pyfunc.load_model("models:/brainlm-reg/2").predict(x)
    assert embed.shape == (3, 32)  # the backbone's pyfunc: CLS embeddings

    tags = lineage("models:/brainlm-finetuned-age@champion")
    assert tags["pretrained_model"] == "brainlm-finetuned-age" and tags["pretrained_version"] == "1"
    assert lineage(str(store["finetuned"])) == {"pretrained_uri": str(Path(store["finetuned"]).resolve())}
