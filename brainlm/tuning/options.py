"""How a sweep runs, whatever it sweeps: ``SweepOptions``, the ``brainlm tune`` flags every sweep kind shares. No ray
here: the command line builds its flags from it before ray is imported."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from brainlm.exceptions import ConfigError

log = logging.getLogger(__name__)


@dataclass
class SweepOptions:
    """How a sweep runs, whatever it sweeps."""

    samples: int = 8
    """trials drawn from the space (x every grid axis)"""
    cpus_per_trial: float = 1.0
    """CPUs per trial"""
    gpus_per_trial: float = 0.0
    """GPUs per trial"""
    address: str | None = None
    """a Ray cluster: auto (on a node of it) or ray://HEAD:10001 (default: start a local Ray on 127.0.0.1)"""
    num_cpus: int | None = None
    """CPUs of the local Ray (default: all of this machine's)"""
    storage: str = "runs/ray"
    """where Ray keeps trial results and checkpoints: a folder or s3://bucket/prefix"""
    name: str | None = None
    """the sweep's name: its folder under --storage and its MLflow parent run (default KIND[-TARGET]-DATE-TIME)"""
    resume: bool = False
    """continue the interrupted sweep --name under --storage"""
    retry_errored: bool = False
    """with --resume: run errored trials again"""
    experiment: str = "brainlm-sweeps"
    """MLflow experiment; the store is MLFLOW_TRACKING_URI"""
    out: str | None = None
    """folder for the summary table and figures (default runs/sweeps/NAME)"""
    grace_period: int | None = None
    """ASHA: least progress before a trial can be stopped (default 1 epoch; 40 perturbation steps)"""
    reduction_factor: int = 3
    """ASHA: keep the best 1/N at each rung"""

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ConfigError(f"--samples must be at least 1, got {self.samples}")
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0:
            raise ConfigError(
                f"--cpus-per-trial must be > 0 and --gpus-per-trial >= 0, got {self.cpus_per_trial} "
                f"and {self.gpus_per_trial}"
            )
        if self.reduction_factor < 2:
            raise ConfigError(f"--reduction-factor must be at least 2, got {self.reduction_factor}")
        if self.resume and not self.name:
            raise ConfigError(
                f"--resume needs --name NAME: the sweep to continue (its folder under --storage {self.storage})"
            )
        if self.address and "://" not in self.storage:
            log.warning(
                f"--storage {self.storage} is a local path but the sweep runs on a cluster "
                f"({self.address}); use shared storage (s3://...) so every node can write its results"
            )
