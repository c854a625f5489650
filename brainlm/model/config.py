"""The model's schema (`ModelConfig`) and its named presets, from `debug` to `1b`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from brainlm.exceptions import ConfigError
from brainlm.masking import MASKINGS

SPATIAL_ENCODINGS = ("linear", "fourier")
ATTENTION_BACKENDS = ("sdpa", "xformers", "math")
BLOCK_NORMS = ("pre", "post")
TEMPORAL_LAYOUTS = ("halves", "interleaved")
DECODER_HEADS = ("linear", "mlp")
DECODER_ATTENTIONS = ("joint", "factorized")
DECODER_PRIORS = ("none", "gaussian")
NON_NEGATIVE = {"value_conv_kernel"}  # int fields where 0 means off
# Keys older exported configs carry that are no longer model fields: activation checkpointing is a training choice
# now (`train.activation_checkpointing`), not part of what a model computes.
LEGACY = {"activation_checkpointing"}


@dataclass
class ModelConfig:
    """Sizes and options of a BrainLM masked autoencoder. Every field is a `model.<field>` override."""

    num_parcels: int = 424
    """R, parcels of the atlas. Sizes the learned per-parcel table and the FLOP count; otherwise the
    coordinates passed at run time decide R."""
    num_timepoints: int = 200
    """T, timepoints per window (the crop length). Inputs may use any T divisible by `patch_size`."""
    patch_size: int = 20
    """P, timepoints per patch (token)."""
    hidden_size: int = 512
    """D, encoder width."""
    num_layers: int = 4
    """Encoder blocks."""
    num_heads: int = 4
    """Encoder attention heads; must divide `hidden_size`."""
    intermediate_size: int | None = None
    """Encoder MLP width; None means 4 * hidden_size."""
    decoder_hidden_size: int = 512
    """Decoder width."""
    decoder_num_layers: int = 2
    """Decoder blocks."""
    decoder_num_heads: int = 4
    """Decoder attention heads; must divide `decoder_hidden_size`."""
    decoder_intermediate_size: int | None = None
    """Decoder MLP width; None means 4 * decoder_hidden_size."""
    mask_ratio: float = 0.75
    """Share of masked units (tokens, patch indices or parcels, by `masking`), in (0, 1)."""
    masking: str = "random"
    """random (over all tokens, the paper) | tube (the same patch indices in every parcel) |
    parcel (whole parcels) | future (the last patches of every parcel: forecasting)."""
    spatial_encoding: str = "linear"
    """linear: Linear(3 -> D) of the MNI coordinates (the paper) | fourier: random Fourier features of
    the coordinates followed by an MLP."""
    learned_parcel_embedding: bool = False
    """Add a learned [num_parcels, D] table to the spatial embedding (ties the model to one atlas)."""
    norm_target: bool = False
    """Reconstruct per-patch normalised targets (MAE's norm_pix_loss)."""
    attention_backend: str = "sdpa"
    """sdpa (fused kernels, default) | xformers (CUDA only, needs xformers) | math (explicit weights)."""
    dropout: float = 0.0
    """Dropout on the residual branches (attention projection and MLP), in [0, 1)."""
    layer_norm_eps: float = 1e-6
    """LayerNorm epsilon."""
    block_norm: str = "pre"
    """pre: LayerNorm before attention and MLP (ViT, MAE) | post: after each residual sum (BERT; the released
    BrainLM weights)."""
    value_conv_kernel: int = 0
    """0 (off) | an odd k: a depthwise (per-head) convolution over the token axis on the attention values, added to
    the attention output (the released BrainLM's Nystromformer layer: k = 65). It sees the token order."""
    temporal_layout: str = "halves"
    """Columns of the patch-index sinusoid: halves ([sin | cos], MAE) | interleaved (sin, cos alternating; the
    released BrainLM weights)."""
    decoder_attention: str = "joint"
    """joint: every decoder token attends to every other (MAE) | factorized: attention along time within each
    parcel, then across parcels within each patch (divided space-time attention; ties the decoder to the
    coordinates' parcel count at run time, not to an atlas)."""
    decoder_head: str = "linear"
    """linear: Linear(E -> P) (MAE) | mlp: Linear(E -> E/2) -> LeakyReLU(0.1) -> Linear(E/2 -> P) (the paper)."""
    decoder_prior: str = "none"
    """none: masked tokens enter the decoder as the mask token (MAE) | gaussian: each masked patch also carries a
    linear Gaussian imputation from the visible parcels (the training split's covariance shrunk toward the
    window's own: the adaptive baseline, brainlm/model/prior.py), and the decoder predicts the correction to it.
    The prior's statistics are fitted on the training split when pretraining starts."""
    prior_ridge: float = 0.1
    """lam of the Gaussian prior: ridge on the visible parcels' covariance, in units of its mean variance."""
    prior_shrinkage: float = 0.25
    """alpha of the Gaussian prior: weight of the window's own covariance against the training split's, in [0, 1]."""
    prior_context: float = 0.0
    """Recording context in the Gaussian prior: the strength k, in timepoints, of the training split's covariance C
    against the covariance C_c of the n timepoints of the window's recording outside the window, (k C + n C_c) /
    (k + n), before the window's own shrinkage; 0: the prior ignores context. In training the context is the rest of
    the sample's crop; in the analyses, the other windows of the recording (``brainlm reconstruct --context``)."""

    time_unit_s: float = 0.0
    """0: temporal positions count patches, as MAE's count image patches: a model is trained at one TR and a
    recording at another is resampled to it. > 0 (seconds, e.g. the TR of the main training set): the model is
    TR-aware: a patch's temporal position is its start time in units of `time_unit_s * patch_size` seconds, every
    token carries a learned offset scaled by log(TR / time_unit_s), and every forward takes the window's `tr`; one
    model then trains on shard sets at several TRs without resampling them."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # f.type is a string: annotations are postponed above
            value = getattr(self, f.name)
            if value is None and f.type == "int | None":
                continue
            if f.type.startswith("int"):
                least, what = (0, "a non-negative") if f.name in NON_NEGATIVE else (1, "a positive")
                if not isinstance(value, int) or isinstance(value, bool) or value < least:
                    raise ConfigError(f"`model.{f.name}` must be {what} integer, got {value!r}")
            elif f.type == "float" and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                raise ConfigError(f"`model.{f.name}` must be a number, got {value!r}")
            elif f.type == "bool" and not isinstance(value, bool):
                raise ConfigError(f"`model.{f.name}` must be true or false, got {value!r}")
            elif f.type == "str" and not isinstance(value, str):
                raise ConfigError(f"`model.{f.name}` must be a string, got {value!r}")
        if self.num_timepoints % self.patch_size:
            raise ConfigError(
                f"`model.num_timepoints` ({self.num_timepoints}) must be divisible by `model.patch_size` "
                f"({self.patch_size})"
            )
        for width, heads in (("hidden_size", "num_heads"), ("decoder_hidden_size", "decoder_num_heads")):
            if getattr(self, width) % getattr(self, heads):
                raise ConfigError(
                    f"`model.{width}` ({getattr(self, width)}) must be divisible by `model.{heads}` "
                    f"({getattr(self, heads)})"
                )
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"`model.mask_ratio` must be in (0, 1), got {self.mask_ratio!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"`model.dropout` must be in [0, 1), got {self.dropout!r}")
        if not self.layer_norm_eps > 0.0:
            raise ConfigError(f"`model.layer_norm_eps` must be positive, got {self.layer_norm_eps!r}")
        if not self.prior_ridge > 0.0:
            raise ConfigError(f"`model.prior_ridge` must be positive, got {self.prior_ridge!r}")
        if not 0.0 <= self.prior_shrinkage <= 1.0:
            raise ConfigError(f"`model.prior_shrinkage` must be in [0, 1], got {self.prior_shrinkage!r}")
        if self.prior_context < 0 or (self.prior_context and self.decoder_prior != "gaussian"):
            raise ConfigError(
                f"`model.prior_context` must be >= 0 and needs `model.decoder_prior: gaussian`; got "
                f"{self.prior_context!r} with decoder_prior {self.decoder_prior!r}"
            )
        if self.decoder_prior == "gaussian" and self.norm_target:
            raise ConfigError(
                "`model.decoder_prior: gaussian` predicts a correction to values, and `model.norm_target` makes the "
                "targets per-patch normalised: turn one of them off"
            )
        if self.time_unit_s < 0:
            raise ConfigError(f"`model.time_unit_s` must be 0 (one TR) or a TR in seconds; got {self.time_unit_s!r}")
        if self.value_conv_kernel and self.value_conv_kernel % 2 == 0:
            raise ConfigError(
                f"`model.value_conv_kernel` must be 0 or odd (a centred kernel), got {self.value_conv_kernel}"
            )
        for name, choices in (
            ("masking", MASKINGS),
            ("spatial_encoding", SPATIAL_ENCODINGS),
            ("attention_backend", ATTENTION_BACKENDS),
            ("block_norm", BLOCK_NORMS),
            ("temporal_layout", TEMPORAL_LAYOUTS),
            ("decoder_head", DECODER_HEADS),
            ("decoder_attention", DECODER_ATTENTIONS),
            ("decoder_prior", DECODER_PRIORS),
        ):
            if getattr(self, name) not in choices:
                raise ConfigError(f"`model.{name}` must be one of {', '.join(choices)}; got {getattr(self, name)!r}")

    @property
    def num_patches(self) -> int:
        """N, patches per parcel in a window of `num_timepoints`."""
        return self.num_timepoints // self.patch_size

    @property
    def num_tokens(self) -> int:
        """L = R * N tokens per window."""
        return self.num_parcels * self.num_patches

    @property
    def mlp_dim(self) -> int:
        """Encoder MLP width."""
        return self.intermediate_size or 4 * self.hidden_size

    @property
    def decoder_mlp_dim(self) -> int:
        """Decoder MLP width."""
        return self.decoder_intermediate_size or 4 * self.decoder_hidden_size

    @property
    def head_dim(self) -> int:
        """Encoder width per head."""
        return self.hidden_size // self.num_heads

    @property
    def decoder_head_dim(self) -> int:
        """Decoder width per head."""
        return self.decoder_hidden_size // self.decoder_num_heads

    def to_dict(self) -> dict[str, Any]:
        """All fields, JSON-serialisable."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from `to_dict()` output or a recipe's `model:` section; unknown keys are errors."""
        d = {k: v for k, v in d.items() if k not in LEGACY}
        _check_fields(d)
        return cls(**d)


def _check_fields(d: dict[str, Any]) -> None:
    valid = [f.name for f in dataclasses.fields(ModelConfig)]
    unknown = sorted(set(d) - set(valid))
    if unknown:
        keys = ", ".join(f"`model.{k}`" for k in unknown)
        raise ConfigError(f"Unknown config key(s) {keys}; valid keys: {', '.join(valid)}")


# Scaled by width, depth and heads. Parameter counts (tested to be within 10% of the name): debug 28k,
# 13m 12.9M (the paper's model), 111m 111M (ViT-B encoder, MAE's 8 x 512 decoder), 650m 654M (ViT-H
# encoder), 1b 1.03B.
PRESETS: dict[str, dict[str, Any]] = {
    "debug": dict(
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=64,
        decoder_hidden_size=32,
        decoder_num_layers=1,
        decoder_num_heads=2,
        decoder_intermediate_size=64,
    ),
    "13m": dict(
        hidden_size=512,
        num_layers=4,
        num_heads=4,
        intermediate_size=1024,
        decoder_hidden_size=512,
        decoder_num_layers=2,
        decoder_num_heads=4,
        decoder_intermediate_size=1024,
    ),
    "111m": dict(
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        intermediate_size=3072,
        decoder_hidden_size=512,
        decoder_num_layers=8,
        decoder_num_heads=16,
        decoder_intermediate_size=2048,
    ),
    "650m": dict(
        hidden_size=1280,
        num_layers=32,
        num_heads=16,
        intermediate_size=5120,
        decoder_hidden_size=512,
        decoder_num_layers=8,
        decoder_num_heads=16,
        decoder_intermediate_size=2048,
    ),
    "1b": dict(
        hidden_size=1408,
        num_layers=40,
        num_heads=16,
        intermediate_size=6144,
        decoder_hidden_size=512,
        decoder_num_layers=8,
        decoder_num_heads=16,
        decoder_intermediate_size=2048,
    ),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset with `overrides` applied, e.g. `get_preset("13m", masking="tube")`."""
    if name not in PRESETS:
        raise ConfigError(f"Unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
    _check_fields(overrides)
    return ModelConfig(**{**PRESETS[name], **overrides})
