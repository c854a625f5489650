"""The MLflow model registry: register exported models, resolve ``models:/NAME@ALIAS`` to a local folder.

mlflow is imported here and in brainlm/training/tracking.py only.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import mlflow.pyfunc

from brainlm.exceptions import BrainLMError

PIP_REQUIREMENTS = ["brainlm", "torch", "safetensors", "numpy"]


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


def log_and_register(model_dir: str | Path, name: str, alias: str, tags: dict[str, str]) -> int:
    """Within the active run: log ``model_dir`` as a pyfunc model, register it, point ``alias`` at it."""
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=BrainLMPyfunc(),
        artifacts={"model_dir": str(model_dir)},
        pip_requirements=PIP_REQUIREMENTS,
    )
    version = mlflow.register_model(info.model_uri, name, tags=tags)
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
                "registry URI like models:/brainlm-debug@latest"
            )
        return path
    cache = Path(cache or os.environ.get("BRAINLM_CACHE", Path.home() / ".cache" / "brainlm")) / "models"
    target = cache / uri.replace(":/", "_").replace("/", "_").replace("@", "_")
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
