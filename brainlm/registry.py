"""The MLflow model registry and the runs of sweeps.

- ``log_and_register`` / ``resolve_model``: register exported models, resolve ``models:/NAME@ALIAS`` to a folder.
- ``list_models`` / ``list_versions`` / ``describe`` / ``promote`` / ``download``: what ``brainlm registry`` shows.
- ``SweepRuns``: one parent run per sweep and a nested child run per trial, written by the sweep's driver
  through explicit run ids (parallel trials never write to the store themselves, so a sqlite store does not
  contend).

mlflow is imported here and in brainlm/training/tracking.py only.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
from mlflow.exceptions import MlflowException

from brainlm.exceptions import BrainLMError

PIP_REQUIREMENTS = ["brainlm", "torch", "safetensors", "numpy"]
RESERVED_ALIAS = re.compile(r"^(latest|v\d+)$", re.IGNORECASE)  # MLflow's own: models:/NAME/latest, @v3
PARENT_TAG, TRIAL_TAG, SWEEP_TAG = "mlflow.parentRunId", "brainlm.trial_id", "brainlm.sweep_path"


class BrainLMPyfunc(mlflow.pyfunc.PythonModel):
    """The registered artifact: the exported model folder, loadable as a pyfunc whose predict() returns
    CLS embeddings of ``[B, R, T]`` robust-scaled signals."""

    # predict() takes arrays of any batch size, which MLflow's type-hint validation cannot describe.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from brainlm.model import BrainLM

        self.model = BrainLM.from_pretrained(context.artifacts["model_dir"])

    def predict(self, context, model_input, params=None):
        import numpy as np
        import torch

        coords = torch.tensor(self.model.extra["atlas"]["coords_mm"], dtype=torch.float32)
        with torch.no_grad():
            cls_BD, _ = self.model.encode(torch.as_tensor(np.asarray(model_input, dtype=np.float32)), coords)
        return cls_BD.numpy()


class BrainLMPredictionPyfunc(mlflow.pyfunc.PythonModel):
    """A fine-tuned model (backbone + head, as ``brainlm finetune`` saves it) as a pyfunc: predict() takes
    ``[B, R, T]`` robust-scaled signals and returns ``[B, 1]`` predictions in the target's own units
    (regression; the training transform is inverted) or ``[B, classes]`` probabilities (classification)."""

    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from brainlm.model import BrainLMForPrediction

        self.model = BrainLMForPrediction.from_pretrained(context.artifacts["model_dir"])

    def predict(self, context, model_input, params=None):
        import numpy as np
        import torch

        extra = self.model.backbone.extra or {}
        coords = torch.tensor(extra["atlas"]["coords_mm"], dtype=torch.float32)
        with torch.no_grad():
            out_BO = self.model(torch.as_tensor(np.asarray(model_input, dtype=np.float32)), coords)
        if extra.get("classes"):
            return torch.softmax(out_BO, dim=-1).numpy()
        if extra.get("transform"):
            from brainlm.eval.finetune import Transform

            return Transform(**extra["transform"]).inverse(out_BO.numpy().astype(np.float64))
        return out_BO.numpy()


def log_and_register(
    model_dir: str | Path,
    name: str,
    alias: str,
    tags: dict[str, str],
    python_model: mlflow.pyfunc.PythonModel | None = None,
) -> int:
    """Within the active run: log ``model_dir`` as a pyfunc model, register it, point ``alias`` at it.

    The pyfunc is BrainLMPredictionPyfunc for a folder with a prediction head (head.json), else BrainLMPyfunc."""
    check_alias(alias)
    if python_model is None:
        python_model = BrainLMPredictionPyfunc() if (Path(model_dir) / "head.json").exists() else BrainLMPyfunc()
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=python_model,
        artifacts={"model_dir": str(model_dir)},
        pip_requirements=PIP_REQUIREMENTS,
    )
    version = mlflow.register_model(info.model_uri, name, tags={k: str(v) for k, v in tags.items()})
    mlflow.MlflowClient().set_registered_model_alias(name, alias, version.version)
    return int(version.version)


def resolve_model(uri: str | Path, cache: str | Path | None = None) -> Path:
    """A local model folder (with model.safetensors) for a folder path or ``models:/NAME@ALIAS|VERSION``."""
    uri = str(uri)
    if not uri.startswith(("models:/", "runs:/")):
        path = Path(uri)
        if not (path / "config.json").exists():
            raise BrainLMError(
                f"--model {uri}: expected an exported model folder (model.safetensors + config.json) or a "
                "registry URI like models:/brainlm-debug@current"
            )
        return path
    cache = Path(cache or os.environ.get("BRAINLM_CACHE", Path.home() / ".cache" / "brainlm")) / "models"
    target = cache / uri.replace(":/", "_").replace("/", "_").replace("@", "_")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per file of a small folder
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(target)))
    except Exception as err:
        raise BrainLMError(
            f"--model {uri}: could not fetch it from the MLflow registry at {mlflow.get_tracking_uri()} "
            f"({type(err).__name__}: {err}); check MLFLOW_TRACKING_URI and `brainlm registry list`"
        ) from err
    found = sorted(local.rglob("model.safetensors"))
    if not found:
        raise BrainLMError(f"--model {uri}: the registered artifact holds no model.safetensors")
    return found[0].parent


# -- reading and changing the registry ---------------------------------------------------------------------


def tracking_store() -> str:
    """Which MLflow store is in use, and where that choice came from (for the first line users see)."""
    uri = mlflow.get_tracking_uri()
    if os.environ.get("MLFLOW_TRACKING_URI"):
        source = "from MLFLOW_TRACKING_URI"
    else:
        source = "MLflow's default; set MLFLOW_TRACKING_URI to use another store"
    return f"{uri} ({source})"


def check_alias(alias: str) -> None:
    if RESERVED_ALIAS.match(alias):
        raise BrainLMError(
            f"alias {alias!r} is reserved by MLflow (models:/NAME/latest is the newest version, @vN a version "
            "number); choose another name, e.g. champion or current"
        )


def _client() -> mlflow.MlflowClient:
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    return mlflow.MlflowClient()


def _missing(err: MlflowException) -> bool:
    return err.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or "not found" in str(err).lower()


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` -> (NAME, None, ALIAS); ``models:/NAME/3`` -> (NAME, "3", None)."""
    if not uri.startswith("models:/"):
        raise BrainLMError(f"{uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    rest = uri[len("models:/") :].strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, None, alias
    name, _, version = rest.partition("/")
    if not name or not version:
        raise BrainLMError(f"{uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    return name, version, None


def get_version(name: str, version: str | int | None = None, alias: str | None = None):
    """One registered version by number, alias, or ``latest`` (the newest); clear errors when missing."""
    client = _client()
    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if not _missing(err):
            raise
        known = ", ".join(m.name for m in client.search_registered_models()) or "none"
        raise BrainLMError(
            f"no registered model {name!r} in {mlflow.get_tracking_uri()}; registered: {known}"
        ) from None
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        if version is None or str(version) == "latest":
            versions = client.search_model_versions(f"name = '{name}'")
            return max(versions, key=lambda v: int(v.version))
        return client.get_model_version(name, str(version))
    except MlflowException as err:
        if not _missing(err):
            raise
        aliases = client.get_registered_model(name).aliases
        what = f"alias {alias!r}" if alias is not None else f"version {version}"
        listed = ", ".join(f"{a} -> {v}" for a, v in sorted(aliases.items())) or "no aliases"
        raise BrainLMError(f"{name} has no {what} ({listed}); see `brainlm registry list {name}`") from None


def lineage(uri: str) -> dict[str, str]:
    """Tags that say which pretrained model a derived one came from: for a ``models:/`` URI its registered
    name, version and run; for a folder its path."""
    if not uri.startswith("models:/"):
        return {"pretrained_uri": str(Path(uri).resolve()) if "://" not in uri else uri}
    name, version, alias = parse_model_uri(uri)
    v = get_version(name, version, alias)
    return {
        "pretrained_uri": uri,
        "pretrained_model": name,
        "pretrained_version": str(v.version),
        "pretrained_run_id": v.run_id or "",
    }


def _when(ms: int | None) -> str:
    return datetime.datetime.fromtimestamp((ms or 0) / 1000).strftime("%Y-%m-%d %H:%M") if ms else ""


def list_models() -> list[dict[str, Any]]:
    """Every registered model: name, version count, newest version, aliases, last update."""
    client = _client()
    out = []
    for m in sorted(client.search_registered_models(), key=lambda m: m.name):
        versions = client.search_model_versions(f"name = '{m.name}'")
        out.append(
            {
                "name": m.name,
                "versions": len(versions),
                "newest": max((int(v.version) for v in versions), default=0),
                "aliases": {a: int(v) for a, v in sorted(m.aliases.items())},
                "updated": _when(m.last_updated_timestamp),
            }
        )
    return out


def list_versions(name: str) -> list[dict[str, Any]]:
    """The versions of one model, newest first: aliases, creation time, run and data checksum."""
    get_version(name)  # a clear error for an unknown name
    client = _client()
    aliases = client.get_registered_model(name).aliases
    rows = []
    for v in sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: -int(v.version)):
        rows.append(
            {
                "version": int(v.version),
                "aliases": [a for a, n in sorted(aliases.items()) if str(n) == str(v.version)],
                "created": _when(v.creation_timestamp),
                "run_id": v.run_id or "",
                "manifest_sha256": (v.tags or {}).get("manifest_sha256", ""),
                "from": (v.tags or {}).get("pretrained_model", "")
                + (f" v{v.tags['pretrained_version']}" if (v.tags or {}).get("pretrained_version") else ""),
            }
        )
    return rows


def describe(name: str, version: str | None = None, alias: str | None = None) -> dict[str, Any]:
    """One version with its tags (lineage), its run's params and latest metrics, and its sweep (parent run)."""
    v = get_version(name, version, alias)
    client = _client()
    aliases = client.get_registered_model(name).aliases
    out: dict[str, Any] = {
        "name": name,
        "version": int(v.version),
        "aliases": [a for a, n in sorted(aliases.items()) if str(n) == str(v.version)],
        "created": _when(v.creation_timestamp),
        "source": v.source,
        "run_id": v.run_id,
        "tags": dict(sorted((v.tags or {}).items())),
        "params": {},
        "metrics": {},
    }
    if v.run_id:
        try:
            run = client.get_run(v.run_id)
        except MlflowException:
            return out  # the run was deleted; the version still stands
        out["run_name"] = run.info.run_name
        out["experiment_id"] = run.info.experiment_id
        out["params"] = dict(sorted(run.data.params.items()))
        out["metrics"] = dict(sorted(run.data.metrics.items()))
        parent = run.data.tags.get(PARENT_TAG)
        if parent:
            try:
                out["sweep"] = {"run_id": parent, "run_name": client.get_run(parent).info.run_name}
            except MlflowException:
                out["sweep"] = {"run_id": parent}
    return out


def promote(name: str, version: str | int, alias: str) -> int | None:
    """Point ``alias`` of ``name`` at ``version``; returns the version it pointed at before (or None)."""
    check_alias(alias)
    target = get_version(name, str(version))
    aliases = _client().get_registered_model(name).aliases
    before = aliases.get(alias)
    _client().set_registered_model_alias(name, alias, str(target.version))
    return int(before) if before is not None else None


def download(uri: str, out: str | Path) -> Path:
    """Fetch a model (``models:/NAME@ALIAS|VERSION`` or a folder) into ``out``: model.safetensors,
    config.json, scaling.json, extra.json (and head files for a fine-tuned model)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BrainLMError(f"--out {out}: expected a folder, found a file")
    if uri.startswith("models:/"):
        name, version, alias = parse_model_uri(uri)
        get_version(name, version, alias)  # a clear error before the download
    with tempfile.TemporaryDirectory() as tmp:
        folder = resolve_model(uri, cache=tmp)
        shutil.copytree(folder, out, dirs_exist_ok=True)
    return out


# -- sweeps: a parent run and a child per trial ------------------------------------------------------------


def _artifact_root(uri: str) -> str | None:
    """A local sqlite store keeps artifacts beside the database (as pretraining does); a server decides."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    return None


class SweepRuns:
    """The MLflow side of a sweep, used from the driver only: explicit run ids, no active-run state.

    Picklable (Ray Tune pickles its callbacks with the experiment, for ``--resume``): the client is made
    again on first use and children are found again by their trial-id tag."""

    def __init__(self, experiment: str, uri: str | None = None) -> None:
        self.uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
        self.experiment = experiment
        self.parent_id: str | None = None
        self._client: mlflow.MlflowClient | None = None
        self._children: dict[str, str] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "experiment": self.experiment, "parent_id": self.parent_id}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _client=None, _children={})

    @property
    def client(self) -> mlflow.MlflowClient:
        if self._client is None:
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
            logging.getLogger("mlflow").setLevel(logging.ERROR)
            self._client = mlflow.MlflowClient(tracking_uri=self.uri)
        return self._client

    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        return self.client.create_experiment(self.experiment, artifact_location=_artifact_root(self.uri))

    def open_parent(self, name: str, key: str, params: dict[str, Any], tags: dict[str, str], resume: bool) -> str:
        """Start the sweep's run (tagged with ``key``, its storage path), or with ``resume`` reopen it."""
        exp = self._experiment_id()
        if resume:
            found = self.client.search_runs(
                [exp], f"tags.`{SWEEP_TAG}` = '{key}'", order_by=["start_time DESC"], max_results=1
            )
            if found:
                self.parent_id = found[0].info.run_id
                self.client.update_run(self.parent_id, status="RUNNING")
                return self.parent_id
        run = self.client.create_run(exp, run_name=name, tags={**tags, SWEEP_TAG: key})
        self.parent_id = run.info.run_id
        self.log_params(self.parent_id, params)
        return self.parent_id

    def child(self, trial_id: str, params: dict[str, Any]) -> str:
        """The child run of one trial: found again by its tag (after --resume), else created."""
        if trial_id in self._children:
            return self._children[trial_id]
        assert self.parent_id, "open_parent() first"
        exp = self._experiment_id()
        found = self.client.search_runs(
            [exp], f"tags.`{PARENT_TAG}` = '{self.parent_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'", max_results=1
        )
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            run_id = self.client.create_run(
                exp, run_name=f"trial-{trial_id}", tags={PARENT_TAG: self.parent_id, TRIAL_TAG: trial_id}
            ).info.run_id
            self.log_params(run_id, params)
        self._children[trial_id] = run_id
        return run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = [Param(k, str(v)[:6000]) for k, v in _flatten(params).items()]
        for i in range(0, len(flat), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=flat[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(datetime.datetime.now().timestamp() * 1000)
        batch = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(run_id, metrics=batch[i : i + 1000])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, k, str(v)[:5000])

    def log_artifacts(self, run_id: str, folder: str | Path, artifact_path: str | None = None) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.client.log_artifacts(run_id, str(folder), artifact_path)

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.client.log_artifact(run_id, str(path), artifact_path)

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def register(
        self, run_id: str, model_dir: str | Path, name: str, alias: str, tags: dict[str, str]
    ) -> tuple[int, int | None]:
        """Log ``model_dir`` in run ``run_id``, register it as ``name`` and point ``alias`` at it; returns the
        new version and the one the alias pointed at before (None if it is new)."""
        check_alias(alias)
        before = None
        with contextlib.suppress(MlflowException):  # a new name or a new alias
            before = int(self.client.get_model_version_by_alias(name, alias).version)
        mlflow.set_tracking_uri(self.uri)
        # start_run(run_id) refuses a run outside the process's active experiment (set by anything before).
        mlflow.set_experiment(experiment_id=self.client.get_run(run_id).info.experiment_id)
        with warnings.catch_warnings(), mlflow.start_run(run_id=run_id):
            warnings.simplefilter("ignore")
            version = log_and_register(model_dir, name, alias, tags)
        return version, before


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
