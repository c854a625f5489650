"""Prediction heads on BrainLM embeddings: clinical regression / classification, frozen probe or fine-tune.

Shapes: B batch, R parcels, T timepoints, L tokens, D width, O outputs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from brainlm.exceptions import ConfigError, InputError
from brainlm.model import io
from brainlm.model.inference import tr_of
from brainlm.model.load import load_model
from brainlm.model.mae import BrainLM

HEAD_CONFIG_FILE, HEAD_WEIGHTS_FILE = "head.json", "head.safetensors"
HEAD_POOLINGS = ("cls", "mean")  # what a prediction head reads (latent_fc is an embedding, not a token)


class MLPHead(nn.Module):
    """`num_layers` Linear layers, GELU between them, dropout before each (the paper's probe: 40%)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int | None = None,
        num_layers: int = 2,
        dropout: float = 0.4,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ConfigError(f"`head.num_layers` must be at least 1, got {num_layers}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"`head.dropout` must be in [0, 1), got {dropout}")
        hidden = hidden_dim or in_dim
        dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            if i:
                layers.append(nn.GELU())
            layers += [nn.Dropout(dropout), nn.Linear(dims[i], dims[i + 1])]
        self.net = nn.Sequential(*layers)

    def forward(self, x_BD: Tensor) -> Tensor:
        return self.net(x_BD)


class BrainLMForPrediction(nn.Module):
    """A BrainLM encoder + MLP head on its CLS (or mean token) embedding: signal -> out_BO."""

    def __init__(
        self,
        backbone: BrainLM,
        out_dim: int,
        pooling: str = "cls",
        hidden_dim: int | None = None,
        num_layers: int = 2,
        dropout: float = 0.4,
        freeze_backbone: bool = False,
    ) -> None:
        super().__init__()
        if pooling not in HEAD_POOLINGS:
            raise ConfigError(f"`head.pooling` must be one of {', '.join(HEAD_POOLINGS)}; got {pooling!r}")
        self.backbone = backbone
        self.head_config: dict[str, Any] = dict(
            out_dim=out_dim,
            pooling=pooling,
            hidden_dim=hidden_dim,
            num_layers=num_layers,
            dropout=dropout,
            freeze_backbone=freeze_backbone,
        )
        self.pooling = pooling
        self.freeze_backbone = freeze_backbone
        self.head = MLPHead(backbone.config.hidden_size, out_dim, hidden_dim, num_layers, dropout)
        if freeze_backbone:
            backbone.requires_grad_(False)
            backbone.eval()

    def train(self, mode: bool = True) -> BrainLMForPrediction:
        """As nn.Module.train, but a frozen backbone stays in eval mode (no dropout in a probe)."""
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def forward(self, signal_BRT: Tensor, coords_R3: Tensor, tr: float | None = None) -> Tensor:
        """Predictions [B, O] from signals [B, R, T] and parcel coordinates [R, 3] in MNI mm (``tr``: the windows' TR,
        read by a TR-aware backbone)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            cls_BD, tokens_BLD = self.backbone.encode(signal_BRT, coords_R3, **tr_of(self.backbone, tr))
        pooled_BD = cls_BD if self.pooling == "cls" else tokens_BLD.mean(dim=1)
        return self.head(pooled_BD)

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups of the trainable parameters: the backbone's rules, head weights decayed."""
        groups = self.backbone.param_groups(weight_decay)
        for p in self.head.parameters():
            groups[0 if p.ndim >= 2 else 1]["params"].append(p)
        return groups

    def save_pretrained(
        self,
        path: str | os.PathLike,
        scaling: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """The backbone as `BrainLM.save_pretrained` writes it, plus head.json and head.safetensors."""
        self.backbone.save_pretrained(path, scaling=scaling, extra=extra)
        io.write_folder(
            path, {HEAD_WEIGHTS_FILE: io.tensors_writer(self.head), HEAD_CONFIG_FILE: io.json_writer(self.head_config)}
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> BrainLMForPrediction:
        """Load a folder written by `save_pretrained` (or a registry URI once `brainlm` is imported), in eval mode; the
        scaling is `.backbone.scaling`."""
        folder = io.local_folder(path)
        io.require_files(
            folder,
            (io.CONFIG_FILE, io.WEIGHTS_FILE, HEAD_CONFIG_FILE, HEAD_WEIGHTS_FILE),
            "BrainLMForPrediction.save_pretrained",
        )
        backbone = load_model(folder, map_location)
        head_config = json.loads((folder / HEAD_CONFIG_FILE).read_text())
        with torch.device("meta"):
            head = MLPHead(
                backbone.config.hidden_size,
                head_config["out_dim"],
                head_config["hidden_dim"],
                head_config["num_layers"],
                head_config["dropout"],
            )
        io.load_weights(head, folder / HEAD_WEIGHTS_FILE, map_location)
        model = cls(backbone, **head_config)
        model.head = head
        return model.eval()


@dataclass
class Transform:
    """Target transform fitted on training values; inverse() maps predictions back."""

    kind: str
    a: float = 0.0
    b: float = 1.0

    @classmethod
    def fit(cls, kind: str, y: np.ndarray) -> Transform:
        if kind == "logminmax" and (y <= -1).any():
            raise InputError("--transform logminmax needs values > -1 (it takes log(1 + y))")
        z = np.log1p(y) if kind == "logminmax" else y
        if kind == "zscore":
            return cls(kind, float(z.mean()), float(z.std() or 1.0))
        if kind in ("minmax", "logminmax"):
            return cls(kind, float(z.min()), float((z.max() - z.min()) or 1.0))
        return cls("none")

    def __call__(self, y: np.ndarray) -> np.ndarray:
        z = np.log1p(y) if self.kind == "logminmax" else y
        return (z - self.a) / self.b

    def inverse(self, t: np.ndarray) -> np.ndarray:
        z = t * self.b + self.a
        return np.expm1(z) if self.kind == "logminmax" else z
