"""brainlm: foundation models of brain activity (BrainLM masked autoencoders) on parcellated fMRI.

    import brainlm
    model = brainlm.load("models:/brainlm-debug@current")   # a folder, models:/NAME@ALIAS or runs:/...
    model.embed(signal_TR, tr=0.72)                         # your recording, preprocessed as the model was trained

Importing the package is cheap: the names below load their modules on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from brainlm._version import __version__

# public name -> the module that defines it
_EXPORTS = {
    "BrainLM": "brainlm.model.mae",
    "BrainLMForPrediction": "brainlm.model.heads",
    "ModelConfig": "brainlm.model.config",
    "get_preset": "brainlm.model.config",
    "load": "brainlm.api",
    "embed_files": "brainlm.api",
    "Embeddings": "brainlm.api",
    "BrainLMEmbedder": "brainlm.api",
    "Preprocessing": "brainlm.model.inference",
    "default_device": "brainlm.api",
    "random_weights": "brainlm.eval.common",
    "reconstruct": "brainlm.eval.reconstruct",
    "benchmark": "brainlm.benchmark",
    "BenchmarkConfig": "brainlm.benchmark",
    "finetune": "brainlm.eval.finetune",
    "FinetuneConfig": "brainlm.eval.finetune",
    "networks": "brainlm.eval.networks",
    "fingerprint": "brainlm.eval.fingerprint",
    "perturb": "brainlm.eval.perturb",
    "PerturbConfig": "brainlm.eval.perturb",
    "attention": "brainlm.eval.attention",
    "ShardSet": "brainlm.data.shardset",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'brainlm' has no attribute {name!r}")
    importlib.import_module("brainlm.api")  # registers the models:/ and runs:/ resolvers for from_pretrained
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)
