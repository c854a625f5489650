"""MLflow's environment, in one place: the defaults every MLflow call here runs under, the store a run uses, where
a local store keeps its artifacts, how nested parameters are flattened, and the code version a run records.

The tracking package is the only place mlflow is imported. Its modules, each importing only those above it:
env -> pyfunc (the served model) -> registry (log, register, resolve, list) -> runs (a training run), sweeps (a
sweep's parent and child runs).
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Any

PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag that nests a run under another (a sweep's trials)


def mlflow_defaults() -> None:
    """Fail fast rather than retry for minutes against a server that is not there; no progress bar per file of a
    small model folder; MLflow's own log lines only on errors. Values already in the environment win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(logging.ERROR)


def default_tracking_uri(out_dir: str | Path) -> str:
    """$MLFLOW_TRACKING_URI, else a sqlite store beside the run folder (``runs/mlflow.db``)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(Path(out_dir).resolve().parent / 'mlflow.db')}"


def artifact_root(uri: str) -> str | None:
    """A local sqlite store keeps artifacts beside the database; a server decides its own (None)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    return None


def require_store() -> None:
    """Refuse to read a registry that is not there: with MLFLOW_TRACKING_URI unset MLflow would create an empty
    ./mlflow.db in the working directory and report every model missing."""
    import mlflow

    from brainlm.exceptions import BrainLMError

    if os.environ.get("MLFLOW_TRACKING_URI"):
        return
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists():
        raise BrainLMError(
            "MLFLOW_TRACKING_URI is not set and MLflow's default store "
            f"{uri[len('sqlite:///') :]} does not exist: set MLFLOW_TRACKING_URI to the store that holds the "
            "registry (after make demo: sqlite:///$PWD/demo/runs/mlflow.db), or pass an exported model folder"
        )


def tracking_store() -> str:
    """Which MLflow store is in use, and where that choice came from (for the first line users see)."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if os.environ.get("MLFLOW_TRACKING_URI"):
        source = "from MLFLOW_TRACKING_URI"
    else:
        source = "MLflow's default; set MLFLOW_TRACKING_URI to use another store"
    return f"{uri} ({source})"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: nested recipes as MLflow parameters."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def git_sha() -> str:
    """The checkout's commit, or $BRAINLM_GIT_SHA (set when the container image is built without .git)."""
    if os.environ.get("BRAINLM_GIT_SHA"):
        return os.environ["BRAINLM_GIT_SHA"]
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return done.stdout.strip() or "unknown"
    except Exception:
        return "unknown"
