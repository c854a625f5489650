"""The MLflow model registry: register exported models, resolve ``models:/NAME@ALIAS`` (and ``runs:/``) to a local
folder, and what ``brainlm registry`` shows and changes (list, show, promote, download)."""

from __future__ import annotations

import datetime
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from brainlm.exceptions import BrainLMError
from brainlm.model.io import REGISTRY_SCHEMES, model_folder
from brainlm.tracking.env import PARENT_TAG, mlflow_defaults, require_store
from brainlm.tracking.pyfunc import CODE_PATH, example_and_signature, pip_requirements, python_model_for

RESERVED_ALIAS = re.compile(r"^(latest|v\d+)$", re.IGNORECASE)  # MLflow's own: models:/NAME/latest, @v3


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
        python_model = python_model_for(model_dir)
    example, signature = example_and_signature(model_dir)
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=python_model,
        artifacts={"model_dir": str(model_dir)},
        pip_requirements=pip_requirements(),
        code_paths=[str(CODE_PATH)],
        signature=signature,
        input_example=example,
    )
    version = mlflow.register_model(info.model_uri, name, tags={k: str(v) for k, v in tags.items()})
    mlflow.MlflowClient().set_registered_model_alias(name, alias, version.version)
    return int(version.version)


def resolve_model(uri: str | Path, cache: str | Path | None = None) -> Path:
    """A local model folder (with model.safetensors) for a folder path or ``models:/NAME@ALIAS|VERSION``."""
    uri = str(uri)
    if not uri.startswith(REGISTRY_SCHEMES):
        return model_folder(uri)
    cache = Path(cache or os.environ.get("BRAINLM_CACHE", Path.home() / ".cache" / "brainlm")) / "models"
    target = cache / uri.replace(":/", "_").replace("/", "_").replace("@", "_")
    mlflow_defaults()
    require_store()
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


def check_alias(alias: str) -> None:
    if RESERVED_ALIAS.match(alias):
        raise BrainLMError(
            f"alias {alias!r} is reserved by MLflow (models:/NAME/latest is the newest version, @vN a version "
            "number); choose another name, e.g. champion or current"
        )


def _client() -> mlflow.MlflowClient:
    mlflow_defaults()
    require_store()
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
