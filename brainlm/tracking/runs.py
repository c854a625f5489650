"""A training run in MLflow (rank 0 only). Tracking never kills a run: the first failure (an unreachable server, a
broken store) is reported once and tracking is switched off for the rest of the run."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from brainlm.tracking.env import artifact_root, flatten, mlflow_defaults

log = logging.getLogger(__name__)


def _reachable(uri: str) -> str | None:
    """None when ``uri`` answers; else why not. Only http(s) servers can be unreachable."""
    if not uri.startswith(("http://", "https://")):
        return None
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5):
            return None
    except Exception as err:
        return f"{type(err).__name__}: {err}"


class Tracker:
    """One MLflow run (rank 0 only). All methods are no-ops once tracking is off."""

    def __init__(self, uri: str, experiment: str, enabled: bool = True) -> None:
        self.uri, self.experiment, self.enabled = uri, experiment, enabled
        self.run_id: str | None = None
        self.artifact_root = artifact_root(uri)
        if enabled:
            mlflow_defaults()
            problem = _reachable(uri)
            if problem:
                self._off(f"MLflow at {uri} is unreachable ({problem})")

    def _off(self, why: str) -> None:
        if self.enabled:
            log.warning(f"{why}; tracking is off for this run, training goes on")
        self.enabled = False

    def _call(self, what: str, fn, *args, **kwargs):
        if not self.enabled:
            return None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return fn(*args, **kwargs)
        except Exception as err:
            self._off(f"MLflow {what} failed ({type(err).__name__}: {err})")
            return None

    def start(
        self, run_name: str, params: dict[str, Any], tags: dict[str, str], resume_run_id: str | None = None
    ) -> None:
        def go():
            import mlflow

            mlflow.set_tracking_uri(self.uri)
            if mlflow.get_experiment_by_name(self.experiment) is None:
                mlflow.create_experiment(self.experiment, artifact_location=self.artifact_root)
            mlflow.set_experiment(self.experiment)
            run = mlflow.start_run(run_id=resume_run_id, run_name=None if resume_run_id else run_name)
            self.run_id = run.info.run_id
            if not resume_run_id:
                mlflow.log_params(flatten(params))
            mlflow.set_tags(tags)

        self._call("start", go)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import mlflow

        self._call("log_metrics", mlflow.log_metrics, metrics, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        import mlflow

        self._call("log_artifact", mlflow.log_artifact, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        import mlflow

        self._call("set_tags", mlflow.set_tags, tags)

    def log_dict(self, data: dict, name: str) -> None:
        import mlflow

        self._call("log_dict", mlflow.log_dict, data, name)

    def register(self, model_dir: str | Path, name: str, alias: str, tags: dict[str, str] | None = None) -> int | None:
        """Log the exported model as a pyfunc and register it under ``name`` with ``alias``; the version."""

        if not self.enabled:
            return None
        from brainlm.tracking.registry import log_and_register

        return self._call("register", log_and_register, model_dir, name, alias, tags or {})

    def tag(self, name: str) -> str | None:
        """A tag of this run as MLflow holds it (None when unset or tracking is off)."""

        def get():
            import mlflow

            return mlflow.get_run(self.run_id).data.tags.get(name)

        return self._call("get_run", get) if self.run_id else None

    def end(self, status: str = "FINISHED") -> None:
        import mlflow

        self._call("end", mlflow.end_run, status=status)
