"""The registered artifact: an exported model folder served as an MLflow pyfunc."""

from __future__ import annotations

import mlflow.pyfunc

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
            from brainlm.model.heads import Transform

            return Transform(**extra["transform"]).inverse(out_BO.numpy().astype(np.float64))
        return out_BO.numpy()


def python_model_for(model_dir) -> mlflow.pyfunc.PythonModel:
    """BrainLMPredictionPyfunc for a folder with a prediction head (head.json), else BrainLMPyfunc."""
    from pathlib import Path

    return BrainLMPredictionPyfunc() if (Path(model_dir) / "head.json").exists() else BrainLMPyfunc()
