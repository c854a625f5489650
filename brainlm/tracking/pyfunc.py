"""The registered artifact: an exported model folder served as an MLflow pyfunc.

Input: a float32 batch, either raw recordings ``[B, time, parcels]`` (any length of at least one window: scaled,
windowed and checked as the model was trained, ``brainlm.model.inference``) or windows ``[B, parcels, window]``
already scaled. ``params={"input": "recordings" | "windows"}`` says which; by default the shape decides (windows
when the last axis is the model's window and the middle one its parcel count). Output: one row per input row.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

# What the pyfunc's code imports. brainlm itself is not among them: it is not on PyPI, so its code travels with the
# model (``CODE_PATH``, on the path when MLflow loads it), as MLflow's code_paths do.
REQUIRED = ("torch", "safetensors", "numpy", "scipy", "pyyaml", "tqdm", "pandas")
CODE_PATH = Path(__file__).resolve().parents[1]  # the brainlm package


def pip_requirements() -> list[str]:
    """The packages the pyfunc imports, pinned to the public versions installed here, so any index resolves them:
    torch==2.13.0, not the local build label 2.13.0+cpu that only PyTorch's CPU index knows (unpinned where not
    installed)."""
    out = []
    for name in REQUIRED:
        try:
            out.append(f"{name}=={importlib.metadata.version(name).split('+')[0]}")
        except importlib.metadata.PackageNotFoundError:
            out.append(name)
    return out


def _is_windows(x: np.ndarray, num_parcels: int, window: int, params: dict | None) -> bool:
    kind = (params or {}).get("input", "auto")
    if kind not in ("auto", "recordings", "windows"):
        raise ValueError(f"params input must be auto, recordings or windows; got {kind!r}")
    if kind != "auto":
        return kind == "windows"
    return x.ndim == 3 and x.shape[1] == num_parcels and x.shape[2] == window


def _batch(model_input: Any) -> np.ndarray:
    x = np.asarray(model_input, dtype=np.float32)
    return x[None] if x.ndim == 2 else x


class BrainLMPyfunc(mlflow.pyfunc.PythonModel):
    """predict() returns the CLS embedding of each recording (averaged over its windows) or of each window."""

    _skip_type_hint_validation = True  # the signature describes the input; predict() takes any batch

    def load_context(self, context) -> None:
        from brainlm.model.load import load_model

        self.model = load_model(context.artifacts["model_dir"])

    def predict(self, context, model_input, params=None):
        import torch

        m = self.model
        x = _batch(model_input)
        R = len(m.extra["atlas"]["labels"])
        if _is_windows(x, R, m.config.num_timepoints, params):
            coords = torch.tensor(m.extra["atlas"]["coords_mm"], dtype=torch.float32)
            with torch.no_grad():
                return m.encode(torch.from_numpy(x), coords)[0].numpy()
        tr = (params or {}).get("tr") or None  # 0 (the signature's default): not given
        return np.stack([m.embed(r, tr=tr, layout="TR") for r in x]).astype(np.float32)


class BrainLMPredictionPyfunc(mlflow.pyfunc.PythonModel):
    """A fine-tuned model (backbone + head, as ``brainlm finetune`` saves it): predict() returns ``[B, 1]``
    predictions in the target's own units (regression; the training transform is inverted) or ``[B, classes]``
    probabilities (classification), per recording (averaged over its windows) or per window."""

    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from brainlm.model import BrainLMForPrediction

        self.model = BrainLMForPrediction.from_pretrained(context.artifacts["model_dir"])

    def predict(self, context, model_input, params=None):
        import torch

        from brainlm.model.inference import prepare

        backbone = self.model.backbone
        extra = backbone.extra or {}
        coords = torch.tensor(extra["atlas"]["coords_mm"], dtype=torch.float32)
        x = _batch(model_input)
        R = coords.shape[0]

        def head(windows_BRW: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                out_BO = self.model(torch.from_numpy(windows_BRW), coords)
            if extra.get("classes"):
                return torch.softmax(out_BO, dim=-1).numpy()
            if extra.get("transform"):
                from brainlm.model.heads import Transform

                return Transform(**extra["transform"]).inverse(out_BO.numpy().astype(np.float64))
            return out_BO.numpy()

        if _is_windows(x, R, backbone.config.num_timepoints, params):
            return head(x)
        prepared, _ = prepare(backbone, list(x), tr=(params or {}).get("tr") or None, layout="TR")
        return np.stack([head(w).mean(axis=0) for w in prepared.windows])


def python_model_for(model_dir: str | Path) -> mlflow.pyfunc.PythonModel:
    """BrainLMPredictionPyfunc for a folder with a prediction head (head.json), else BrainLMPyfunc."""
    return BrainLMPredictionPyfunc() if (Path(model_dir) / "head.json").exists() else BrainLMPyfunc()


def example_and_signature(model_dir: str | Path):
    """An input example (one raw recording of two windows, [1, time, parcels]) and the signature: a float32 batch of
    any length and width (recordings or windows), one output row per input row, and the ``input`` / ``tr`` params."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    from brainlm.model.io import read_json

    folder = Path(model_dir)
    config = read_json(folder / "config.json")
    extra = read_json(folder / "extra.json") or {}
    R = len(extra["atlas"]["labels"]) if extra.get("atlas") else config["num_parcels"]
    example = np.random.default_rng(0).standard_normal((1, 2 * config["num_timepoints"], R)).astype(np.float32)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1))]),
        params=ParamSchema([ParamSpec("input", "string", "auto"), ParamSpec("tr", "double", 0.0)]),
    )
    return example, signature
