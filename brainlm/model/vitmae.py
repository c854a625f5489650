"""The ViT-MAE BrainLM releases (``vitmae_111M``, ``vitmae_650M``): an image masked autoencoder over the window.

What the release computes (BrainLM's ``modeling_vit_mae_with_padding.py`` around transformers' ViTMAE), and here:
a window [R, T] in robust-scaled units is divided by the release's ``max_val_to_scale`` (5.6430855), its parcels
are sorted by their Y coordinate (the image's rows), it is padded to a square S x S with -1 (centred: (S - R) / 2
rows above and below, (S - T) / 2 columns left and right) and cut into G x G patches of p x p values (G = S / p).
A patch is embedded by a Linear over its p * p values: the release's Conv2d over 3 identical channels is that
Linear with the channels' weights summed. 2-D sin-cos positions, a CLS token, pre-LayerNorm ViT blocks (our
``Block``) over the CLS and visible patches, a decoder over all patches, and a Linear head to p * p values (the
release predicts 3 channels and averages them: the head's channel rows averaged). The loss is the mean squared
error over the masked values inside the window (the padding excluded), in the release's units.

Tokens are the G * G image patches, row-major; mask_BL masks patches. Everything the analyses need in parcels and
timepoints goes through three methods that BrainLM has too (``brainlm/model/grid.py``): ``value_mask`` (which values
a patch mask hides), ``token_parcel_counts`` (how many values of each parcel each token holds: per-parcel attention
and token means) and ``masks_from_seeds``. Only random masking exists for this model (the release's).

Shapes: B batch, R parcels, T timepoints, S image side, G patches per side, p patch side, Q = p * p values per patch,
L = G * G tokens, K kept, D encoder width, E decoder width.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brainlm.exceptions import ConfigError, DimensionError, InputError
from brainlm.masking import sample_mask, seeded_masks
from brainlm.model import io
from brainlm.model.inference import RecordingMethods
from brainlm.model.layers import Block, sincos_1d
from brainlm.model.mae import MAEOutput

ARCHITECTURE = "vitmae"  # config.json's "architecture": how a model folder says it holds this model
RELEASE_INPUT_SCALE = 5.6430855  # the release's max_val_to_scale (its tutorial, and Brainmarks' wrapper)


@dataclass
class ImageMAEConfig:
    """Sizes of a ViT-MAE over the sorted, padded window (the 111M and 650M releases' architecture)."""

    num_parcels: int = 424
    num_timepoints: int = 200
    image_size: int = 432
    """S, the square the window is padded to (432 for the 111M release, 434 for 650M)."""
    patch_size: int = 16
    """p, the side of a square patch (16 for 111M, 14 for 650M)."""
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    decoder_hidden_size: int = 512
    decoder_num_layers: int = 8
    decoder_num_heads: int = 16
    decoder_intermediate_size: int = 2048
    mask_ratio: float = 0.75
    layer_norm_eps: float = 1e-12
    pad_value: float = -1.0
    input_scale: float = RELEASE_INPUT_SCALE
    """The window is divided by this before the model (the release's max_val_to_scale); predictions are multiplied
    back, so inputs and outputs are in robust-scaled units as for every other model here."""
    parcel_order: list[int] = field(default_factory=list)
    """Image row i holds parcel parcel_order[i] (the atlas's parcels sorted by Y); empty: identity."""
    attention_backend: str = "sdpa"
    dropout: float = 0.0
    architecture: str = ARCHITECTURE

    # What the analyses read off every model's config; fixed for this one.
    masking = "random"
    prior_context = 0.0
    learned_parcel_embedding = False

    def __post_init__(self) -> None:
        if self.architecture != ARCHITECTURE:
            raise ConfigError(f"architecture must be {ARCHITECTURE!r}, got {self.architecture!r}")
        S, p, R, T = self.image_size, self.patch_size, self.num_parcels, self.num_timepoints
        if S % p:
            raise ConfigError(f"image_size {S} must be a multiple of patch_size {p}")
        for what, n in (("parcels", R), ("timepoints", T)):
            if n > S or (S - n) % 2:
                raise ConfigError(
                    f"{n} {what} do not pad evenly to the {S} x {S} image (the release pads (S - n) / 2 on each side)"
                )
        if self.parcel_order and sorted(self.parcel_order) != list(range(R)):
            raise ConfigError(f"parcel_order must be a permutation of 0 .. {R - 1}")
        for width, heads in (("hidden_size", "num_heads"), ("decoder_hidden_size", "decoder_num_heads")):
            if getattr(self, width) % getattr(self, heads):
                raise ConfigError(f"{width} {getattr(self, width)} is not divisible by {heads} {getattr(self, heads)}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")

    @property
    def grid(self) -> int:
        """G, patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid**2

    @property
    def pads(self) -> tuple[int, int]:
        """(rows above the parcels, columns before the timepoints)."""
        return (self.image_size - self.num_parcels) // 2, (self.image_size - self.num_timepoints) // 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageMAEConfig:
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise ConfigError(f"unknown ViT-MAE config key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}")
        return cls(**d)


def sincos_2d(grid: int, dim: int) -> Tensor:
    """MAE's fixed 2-D positions [1 + G * G, dim]: a zero row for CLS, then per patch (row i, column j), row-major,
    the 1-D sin-cos of j in the first half of the columns and of i in the second."""
    i, j = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    half = dim // 2
    pos = torch.cat([sincos_1d(j.flatten(), half), sincos_1d(i.flatten(), half)], dim=1)
    return torch.cat([torch.zeros(1, dim), pos])


class ImageMAE(RecordingMethods, nn.Module):
    """The ViT-MAE releases' model: encoder over CLS + visible image patches, decoder over all of them."""

    def __init__(self, config: ImageMAEConfig) -> None:
        super().__init__()
        self.config = c = config
        D, E, Q = c.hidden_size, c.decoder_hidden_size, c.patch_size**2
        block = dict(backend=c.attention_backend, dropout=c.dropout, eps=c.layer_norm_eps)
        self.patch_embed = nn.Linear(Q, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.register_buffer("pos_embed", torch.zeros(1 + c.num_tokens, D), persistent=False)
        self.blocks = nn.ModuleList(Block(D, c.num_heads, c.intermediate_size, **block) for _ in range(c.num_layers))
        self.norm = nn.LayerNorm(D, eps=c.layer_norm_eps)
        self.decoder_embed = nn.Linear(D, E)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, E))
        self.register_buffer("decoder_pos_embed", torch.zeros(1 + c.num_tokens, E), persistent=False)
        self.decoder_blocks = nn.ModuleList(
            Block(E, c.decoder_num_heads, c.decoder_intermediate_size, **block) for _ in range(c.decoder_num_layers)
        )
        self.decoder_norm = nn.LayerNorm(E, eps=c.layer_norm_eps)
        self.decoder_pred = nn.Linear(E, Q)
        self.register_buffer("order_R", torch.zeros(c.num_parcels, dtype=torch.long), persistent=False)
        self.parcel_embed = None  # what the analyses check on every model: no per-atlas table, no decoder prior
        self.decoder_prior_embed = None
        self.scaling: dict[str, Any] | None = None
        self.extra: dict[str, Any] | None = None
        self.fixed_buffers()
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The release's init (transformers' ViTMAE): Linear N(0, 0.02) with zero bias, the patch projection
        xavier_uniform, LayerNorm 1 / 0, CLS and mask token N(0, 0.02). The random-weights control starts here."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def fixed_buffers(self, device: str | torch.device | None = None) -> None:
        """The buffers the config fixes (positions, parcel order), computed: never read from a file."""
        c = self.config
        device = device or self.cls_token.device
        self.pos_embed = sincos_2d(c.grid, c.hidden_size).to(device)
        self.decoder_pos_embed = sincos_2d(c.grid, c.decoder_hidden_size).to(device)
        self.order_R = torch.tensor(c.parcel_order or list(range(c.num_parcels)), device=device)

    # ------------------------------------------------------------------ the image

    def _check(self, signal_BRT: Tensor) -> None:
        c = self.config
        if signal_BRT.ndim != 3 or tuple(signal_BRT.shape[1:]) != (c.num_parcels, c.num_timepoints):
            raise DimensionError(
                f"this ViT-MAE reads windows [batch, {c.num_parcels} parcels, {c.num_timepoints} timepoints] (its "
                f"image is {c.image_size} x {c.image_size}); got {tuple(signal_BRT.shape)}"
            )

    def image(self, signal_BRT: Tensor) -> Tensor:
        """[B, R, T] in robust-scaled units -> the release's input image [B, S, S]: scaled, sorted, padded."""
        self._check(signal_BRT)
        top, left = self.config.pads
        x = signal_BRT[:, self.order_R] / self.config.input_scale
        return F.pad(x, (left, left, top, top), value=self.config.pad_value)

    def window(self, image_BSS: Tensor, unscale: bool = True) -> Tensor:
        """The inverse of `image`: crop, unsort (and unscale) -> [B, R, T]."""
        c = self.config
        top, left = c.pads
        crop = image_BSS[:, top : top + c.num_parcels, left : left + c.num_timepoints]
        out = torch.empty_like(crop)
        out[:, self.order_R.to(crop.device)] = crop
        return out * c.input_scale if unscale else out

    def patchify(self, image_BSS: Tensor) -> Tensor:
        """[B, S, S] -> [B, L, Q]: patch (i, j) is token i * G + j, its values row-major."""
        B, G, p = image_BSS.shape[0], self.config.grid, self.config.patch_size
        return image_BSS.reshape(B, G, p, G, p).permute(0, 1, 3, 2, 4).reshape(B, G * G, p * p)

    def unpatchify_image(self, patches_BLQ: Tensor) -> Tensor:
        B, G, p = patches_BLQ.shape[0], self.config.grid, self.config.patch_size
        return patches_BLQ.reshape(B, G, G, p, p).permute(0, 1, 3, 2, 4).reshape(B, G * p, G * p)

    def unpatchify(self, patches_BLQ: Tensor, num_parcels: int | None = None) -> Tensor:
        """Predicted patches -> [B, R, T] in robust-scaled units, parcels in the atlas's order."""
        return self.window(self.unpatchify_image(patches_BLQ), unscale=False)

    # ------------------------------------------------------------------ the token grid (brainlm/model/grid.py)

    maskings = ("random",)
    parcel_tokens = False  # a token spans several parcels: no per-parcel token sequence (latent_fc)

    @property
    def value_block(self) -> int:
        """Timepoints over which every patch mask is constant, counted from timepoint 0 (what the baselines group)."""
        return math.gcd(self.config.patch_size, self.config.pads[1], self.config.num_timepoints)

    def masks_from_seeds(self, seeds: list[int], num_parcels: int, mask_ratio: float, masking: str) -> Tensor:
        """One random patch mask per seed, as the release masks: a share `mask_ratio` of all G * G patches."""
        self._check_masking(masking)
        G = self.config.grid
        return seeded_masks(seeds, G, G, mask_ratio, "random")

    def _check_masking(self, masking: str) -> None:
        if masking not in self.maskings:
            raise InputError(
                f"masking {masking!r}: the ViT-MAE release masks image patches at random only (masking random); its "
                f"patches span {self.config.patch_size} parcels and {self.config.patch_size} timepoints, so parcel, "
                "tube and future masks are not defined for it"
            )

    def value_mask(self, mask_BL: Tensor, num_parcels: int | None = None) -> np.ndarray:
        """Which values of each window a patch mask hides: [B, R, T] bool."""
        Q = self.config.patch_size**2
        image = self.unpatchify_image(mask_BL.float()[:, :, None].expand(-1, -1, Q).cpu())
        return (self.window(image, unscale=False) > 0.5).numpy()

    def token_parcel_counts(self, num_parcels: int | None = None) -> Tensor:
        """[L, R]: how many of the window's values of each parcel each patch holds (0 for padding)."""
        c = self.config
        G, p = c.grid, c.patch_size
        top, left = c.pads
        rows_G = torch.zeros(G, c.num_parcels)  # patch row i holds parcel r (sorted position s) or not
        sorted_pos = torch.arange(c.num_parcels) + top
        rows_G[sorted_pos // p, self.order_R.cpu()] = 1.0
        cols = torch.zeros(G)
        cols.index_add_(0, (torch.arange(c.num_timepoints) + left) // p, torch.ones(c.num_timepoints))
        return (cols[None, :, None] * rows_G[:, None, :]).reshape(G * G, c.num_parcels)

    # ------------------------------------------------------------------ encoder, decoder, loss

    def _encode_tokens(self, signal_BRT: Tensor) -> Tensor:
        dtype = self.patch_embed.weight.dtype
        return self.patch_embed(self.patchify(self.image(signal_BRT)).to(dtype)) + self.pos_embed[1:].to(dtype)

    def _with_cls(self, tokens_BKD: Tensor) -> Tensor:
        cls = (self.cls_token + self.pos_embed[:1].to(self.cls_token.dtype)).expand(tokens_BKD.shape[0], -1, -1)
        return torch.cat([cls, tokens_BKD], dim=1)

    def forward_encoder(
        self,
        signal_BRT: Tensor,
        mask_ratio: float | None = None,
        *,
        mask_BL: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(latent_B1KD, mask_BL, ids_restore_BL); visible patches in index order."""
        tokens_BLD = self._encode_tokens(signal_BRT)
        B, L, D = tokens_BLD.shape
        if mask_BL is None:
            ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio
            G = self.config.grid
            mask_BL = sample_mask(B, G, G, ratio, "random", generator, tokens_BLD.device)
        else:
            mask_BL = mask_BL.to(tokens_BLD.device).bool().expand(B, L).contiguous()
        counts = mask_BL.sum(1)
        if bool((counts != counts[0]).any()):
            raise InputError(f"every row of mask_BL must mask the same number of patches; got {counts.tolist()}")
        K = L - int(counts[0])
        ids_shuffle_BL = torch.argsort(mask_BL.to(torch.uint8), dim=1, stable=True)
        ids_restore_BL = torch.argsort(ids_shuffle_BL, dim=1)
        kept_BKD = torch.gather(tokens_BLD, 1, ids_shuffle_BL[:, :K, None].expand(B, K, D))
        x = self._with_cls(kept_BKD)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), mask_BL, ids_restore_BL

    def forward_decoder(self, latent_B1KD: Tensor, ids_restore_BL: Tensor) -> Tensor:
        """Predicted patches [B, L, Q] in the release's units."""
        x_B1KE = self.decoder_embed(latent_B1KD)
        B, L = ids_restore_BL.shape
        K, E = x_B1KE.shape[1] - 1, x_B1KE.shape[2]
        x_BLE = torch.cat([x_B1KE[:, 1:], self.mask_token.expand(B, L - K, E)], dim=1)
        x_BLE = torch.gather(x_BLE, 1, ids_restore_BL[:, :, None].expand(B, L, E))
        x = torch.cat([x_B1KE[:, :1], x_BLE], dim=1) + self.decoder_pos_embed.to(x_BLE.dtype)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward(
        self,
        signal_BRT: Tensor,
        coords_R3: Tensor | None = None,
        mask_ratio: float | None = None,
        *,
        mask_BL: Tensor | None = None,
        generator: torch.Generator | None = None,
        context: Any = None,
    ) -> MAEOutput:
        """Masked reconstruction: (loss in the release's units, pred_BLQ in robust-scaled units, mask_BL). The
        parcels' places are the image rows (`config.parcel_order`): `coords_R3` and `context` are not read."""
        latent, mask_BL, ids_restore_BL = self.forward_encoder(
            signal_BRT, mask_ratio, mask_BL=mask_BL, generator=generator
        )
        pred_BLQ = self.forward_decoder(latent, ids_restore_BL)
        Q = self.config.patch_size**2
        m = self.window(self.unpatchify_image(mask_BL[:, :, None].expand(-1, -1, Q).to(pred_BLQ.dtype)), False)
        scaled_BRT = signal_BRT.to(pred_BLQ.dtype) / self.config.input_scale
        err = self.window(self.unpatchify_image(pred_BLQ), unscale=False) - scaled_BRT
        loss = (err.pow(2) * m).sum() / m.sum().clamp(min=1)
        return MAEOutput(loss, pred_BLQ * self.config.input_scale, mask_BL)  # unpatchify: robust-scaled units

    # ------------------------------------------------------------------ inference

    def encode(self, signal_BRT: Tensor, coords_R3: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(cls_BD, tokens_BLD) with no masking: the release's last_hidden_state, tokens in patch order."""
        x = self._with_cls(self._encode_tokens(signal_BRT))
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return x[:, 0], x[:, 1:]

    def cls_attention(
        self,
        signal_BRT: Tensor,
        coords_R3: Tensor | None = None,
        *,
        include_cls: bool = False,
        return_tokens: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """CLS attention of every layer and head over the L patches: attn_BYHL (see `BrainLM.cls_attention`)."""
        x = self._with_cls(self._encode_tokens(signal_BRT))
        rows = []
        for block in self.blocks:
            x, weights_BHL = block(x, return_cls_attention=True)
            rows.append(weights_BHL)
        attn = torch.stack(rows, dim=1)
        attn = attn if include_cls else attn[..., 1:]
        return (attn, self.norm(x)[:, 1:]) if return_tokens else attn

    def fit_prior(self, *args: Any) -> None:
        raise InputError("the ViT-MAE release has no decoder prior to fit")

    def prior_fits(self, coords_R3: Tensor) -> bool:
        return False

    # ------------------------------------------------------------------ accounting and files

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups: decay the matmul weights; not the norms, biases or tokens."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or name in ("cls_token", "mask_token") else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def save_pretrained(
        self, path: str | os.PathLike, scaling: dict[str, Any] | None = None, extra: dict[str, Any] | None = None
    ) -> None:
        """The same folder as `BrainLM.save_pretrained`; config.json says ``"architecture": "vitmae"``."""
        io.save_model(path, self, self.config.to_dict(), scaling, extra)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> ImageMAE:
        model = io.load_model(cls, ImageMAEConfig, path, map_location)
        model.fixed_buffers(torch.device(map_location))  # computed from the config, never read from a file
        return model.eval()
