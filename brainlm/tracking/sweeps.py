"""The MLflow side of a sweep: one parent run and a nested child run per trial, written by the sweep's driver
through explicit run ids (parallel trials never write to the store themselves, so a sqlite store does not contend).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from brainlm.tracking.env import PARENT_TAG, artifact_root, flatten, mlflow_defaults
from brainlm.tracking.registry import check_alias, log_and_register

TRIAL_TAG, SWEEP_TAG = "brainlm.trial_id", "brainlm.sweep_path"


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
            mlflow_defaults()
            self._client = mlflow.MlflowClient(tracking_uri=self.uri)
        return self._client

    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        return self.client.create_experiment(self.experiment, artifact_location=artifact_root(self.uri))

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

        flat = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
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
