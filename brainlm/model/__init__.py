"""The BrainLM model: config and presets, attention backends, the masked autoencoder, prediction heads.

Imports torch and safetensors only (no DeepSpeed, Ray, MLflow, boto3 or nibabel).
"""

from brainlm.model.config import PRESETS, ModelConfig, get_preset
from brainlm.model.heads import BrainLMForPrediction, MLPHead
from brainlm.model.io import load_scaling
from brainlm.model.layers import attention
from brainlm.model.mae import BrainLM, MAEOutput

__all__ = [
    "PRESETS",
    "BrainLM",
    "BrainLMForPrediction",
    "MAEOutput",
    "MLPHead",
    "ModelConfig",
    "attention",
    "get_preset",
    "load_scaling",
]
