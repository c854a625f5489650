"""One entry to a model folder: our BrainLM, or the ViT-MAE releases' image model (config.json says which)."""

from __future__ import annotations

import os

import torch

from brainlm.model import io
from brainlm.model.mae import BrainLM
from brainlm.model.vitmae import ARCHITECTURE, ImageMAE

MODELS = (BrainLM, ImageMAE)


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> BrainLM | ImageMAE:
    """The model in a folder written by `save_pretrained` (or behind a registry URI), in eval mode."""
    folder = io.local_folder(path)
    config = io.read_json(folder / io.CONFIG_FILE) or {}
    cls = ImageMAE if config.get("architecture") == ARCHITECTURE else BrainLM
    return cls.from_pretrained(folder, map_location)
