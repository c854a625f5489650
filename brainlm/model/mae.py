"""BrainLM: a masked autoencoder over parcellated fMRI (Ortega Caro et al., ICLR 2024).

Staged like facebookresearch/mae `models_mae.py`: patchify / unpatchify, random_masking,
forward_encoder, forward_decoder, forward_loss, and a three-line forward.

Shapes (suffixes on every tensor name):
    B batch, R parcels, T timepoints, P timepoints per patch, N = T / P patches per parcel,
    L = R * N tokens, parcel-major (token r * N + n is patch n of parcel r), K kept (visible) tokens,
    D encoder width, E decoder width, H heads, Y encoder layers, "1K" / "1L" = CLS + K / L tokens.
mask_BL is bool, True = removed (masked), as MAE documents its 0/1 mask.

About 500 lines, kept in one file on purpose: the model reads top to bottom as MAE's does, plus the options the
released BrainLM weights need and thin entry points to inference (brainlm/model/inference.py) and files (io.py).
"""

from __future__ import annotations

import math
import os
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from brainlm.exceptions import DimensionError, InputError
from brainlm.masking import MASKINGS, num_kept, sample_mask, seeded_masks, value_mask
from brainlm.model import io, prior
from brainlm.model.config import ModelConfig
from brainlm.model.inference import RecordingMethods
from brainlm.model.layers import Block, FactorizedBlock, FourierCoordEncoder, sincos_1d

# MNI coordinates are in mm, spanning about +-100. The paper fed them raw to Linear(3 -> D); we divide by
# 100 first. The function class is the same (a rescaled weight), but the embedding starts at the scale of
# the patch embedding instead of ~50x larger, and AdamW's per-weight steps are no longer 100x too small.
COORD_SCALE_MM = 100.0


class MAEOutput(NamedTuple):
    """What `BrainLM.forward` returns; unpacks as `loss, pred_BLP, mask_BL = model(...)`.

    A tuple, not a dataclass: DeepSpeed ZeRO-3 finds the output tensors (to re-gather the root module's
    parameters for the backward pass) only inside tuples, lists and dicts."""

    loss: Tensor
    pred_BLP: Tensor
    mask_BL: Tensor


def _spatial_encoder(kind: str, dim: int) -> nn.Module:
    """Linear(3 -> dim) of the coordinates (the paper) or Fourier features + MLP."""
    return nn.Linear(3, dim) if kind == "linear" else FourierCoordEncoder(dim)


class BrainLM(RecordingMethods, prior.PriorMethods, nn.Module):
    """BrainLM's masked autoencoder: encoder over CLS + visible tokens, light decoder over all tokens."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        D, E = c.hidden_size, c.decoder_hidden_size

        # Encoder: patch, spatial (coordinates) and temporal (fixed sinusoid) embeddings, CLS, blocks.
        self.patch_embed = nn.Linear(c.patch_size, D)
        self.spatial_embed = _spatial_encoder(c.spatial_encoding, D)
        self.parcel_embed = nn.Parameter(torch.zeros(c.num_parcels, D)) if c.learned_parcel_embedding else None
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        # TR-aware (`model.time_unit_s` > 0): a learned direction per width, scaled by log(TR / time_unit_s).
        self.tr_embed = nn.Parameter(torch.zeros(D)) if c.time_unit_s else None
        block_args = dict(
            backend=c.attention_backend,
            dropout=c.dropout,
            eps=c.layer_norm_eps,
            norm=c.block_norm,
            value_conv_kernel=c.value_conv_kernel,
        )
        self.blocks = nn.ModuleList(Block(D, c.num_heads, c.mlp_dim, **block_args) for _ in range(c.num_layers))
        self.norm = nn.LayerNorm(D, eps=c.layer_norm_eps)

        # Decoder: its own position embeddings at its own width, mask token, blocks, head to P values.
        self.decoder_embed = nn.Linear(D, E)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, E))
        self.decoder_spatial_embed = _spatial_encoder(c.spatial_encoding, E)
        self.decoder_parcel_embed = nn.Parameter(torch.zeros(c.num_parcels, E)) if c.learned_parcel_embedding else None
        self.decoder_tr_embed = nn.Parameter(torch.zeros(E)) if c.time_unit_s else None
        if c.decoder_attention == "factorized":
            fact_args = dict(backend=c.attention_backend, dropout=c.dropout, eps=c.layer_norm_eps)
            blocks = (
                FactorizedBlock(E, c.decoder_num_heads, c.decoder_mlp_dim, **fact_args)
                for _ in range(c.decoder_num_layers)
            )
        else:
            blocks = (
                Block(E, c.decoder_num_heads, c.decoder_mlp_dim, **block_args) for _ in range(c.decoder_num_layers)
            )
        self.decoder_blocks = nn.ModuleList(blocks)
        self.decoder_norm = nn.LayerNorm(E, eps=c.layer_norm_eps)
        # A plain Linear head, as MAE's decoder_pred; or the paper's E -> E/2 -> LeakyReLU(0.1) -> P.
        if c.decoder_head == "mlp":
            self.decoder_pred = nn.Sequential(nn.Linear(E, E // 2), nn.LeakyReLU(0.1), nn.Linear(E // 2, c.patch_size))
        else:
            self.decoder_pred = nn.Linear(E, c.patch_size)
        # The Gaussian prior (brainlm/model/prior.py): its statistics are buffers (saved with the weights, filled by
        # `fit_prior`), the imputed patch is embedded into the masked tokens, and the head predicts the correction.
        self.decoder_prior_embed = nn.Linear(c.patch_size, E) if c.decoder_prior == "gaussian" else None
        if self.decoder_prior_embed is not None:  # the primary atlas's; one more per atlas of a mixture
            self.add_prior_slot(c.num_parcels)

        self.scaling: dict[str, Any] | None = None  # the robust-scaling statistics, set by from_pretrained
        self.extra: dict[str, Any] | None = None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """MAE's init: xavier_uniform Linear weights (the patch embedding included, as MAE treats its conv
        as a Linear), zero biases, LayerNorm 1/0, N(0, 0.02) for the CLS / mask tokens and parcel tables."""
        for p in (self.cls_token, self.mask_token, self.parcel_embed, self.decoder_parcel_embed):
            if p is not None:
                nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ tokens and positions

    def patchify(self, signal_BRT: Tensor) -> Tensor:
        """[B, R, T] -> [B, L, P], parcel-major: token r * N + n holds signal[:, r, n * P : (n + 1) * P]."""
        B, R, T = signal_BRT.shape
        P = self.config.patch_size
        return signal_BRT.reshape(B, R * (T // P), P)

    def unpatchify(self, patches_BLP: Tensor, num_parcels: int) -> Tensor:
        """[B, L, P] -> [B, R, T], the inverse of `patchify`."""
        B, L, P = patches_BLP.shape
        if L % num_parcels:
            raise DimensionError(f"{L} tokens do not split evenly over {num_parcels} parcels")
        return patches_BLP.reshape(B, num_parcels, (L // num_parcels) * P)

    def _check_inputs(self, signal_BRT: Tensor, coords_R3: Tensor) -> tuple[int, int, int]:
        if signal_BRT.ndim != 3:
            raise DimensionError(f"signal must be [batch, parcels, timepoints]; got shape {tuple(signal_BRT.shape)}")
        B, R, T = signal_BRT.shape
        P = self.config.patch_size
        if T % P:
            raise DimensionError(
                f"the signal's {T} timepoints are not a multiple of `model.patch_size` ({P}); crop it to {T - T % P}"
            )
        if tuple(coords_R3.shape) != (R, 3):
            raise DimensionError(
                f"coordinates must be [parcels, 3] = [{R}, 3] to match the signal; got {tuple(coords_R3.shape)}"
            )
        if self.parcel_embed is not None and self.config.num_parcels != R:
            raise DimensionError(
                f"the signal has {R} parcels but the learned parcel table (`model.learned_parcel_embedding`) "
                f"has `model.num_parcels` = {self.config.num_parcels}; use that atlas or turn the table off"
            )
        return B, R, T

    def _pos_embed(
        self,
        coords_R3: Tensor,
        num_patches: int,
        spatial: nn.Module,
        parcel_RD: Tensor | None,
        dim: int,
        tr: float | None = None,
        tr_D: Tensor | None = None,
    ) -> Tensor:
        """Spatial embedding of each parcel + sinusoid of each patch's position: pos_LD, parcel-major. The position
        is the patch index, or for a TR-aware model its start time in patches of `time_unit_s` (plus `tr_D` scaled
        by log(tr / time_unit_s))."""
        dtype = self.patch_embed.weight.dtype
        spatial_RD = spatial(coords_R3.to(dtype) / COORD_SCALE_MM)
        if parcel_RD is not None:
            spatial_RD = spatial_RD + parcel_RD
        positions_N = torch.arange(num_patches, device=coords_R3.device, dtype=torch.float64)
        scale = self._tr_scale(tr)
        temporal_ND = sincos_1d(positions_N * scale, dim, layout=self.config.temporal_layout).to(dtype)
        if tr_D is not None:
            temporal_ND = temporal_ND + math.log(scale) * tr_D
        return (spatial_RD[:, None, :] + temporal_ND[None, :, :]).flatten(0, 1)

    def _tr_scale(self, tr: float | None) -> float:
        """TR / time_unit_s for a TR-aware model (1 when no TR is given); 1 otherwise."""
        unit = self.config.time_unit_s
        if not unit or tr is None:
            return 1.0
        if not tr > 0:
            raise InputError(f"tr must be a positive number of seconds; got {tr!r}")
        return float(tr) / unit

    def _embed(self, signal_BRT: Tensor, coords_R3: Tensor, tr: float | None = None) -> Tensor:
        """Patch + position embeddings of every token: tokens_BLD."""
        N = signal_BRT.shape[2] // self.config.patch_size
        pos_LD = self._pos_embed(
            coords_R3, N, self.spatial_embed, self.parcel_embed, self.config.hidden_size, tr, self.tr_embed
        )
        return self.patch_embed(self.patchify(signal_BRT)) + pos_LD

    # ------------------------------------------------------------------ the token grid (brainlm/model/grid.py)

    maskings = MASKINGS
    parcel_tokens = True  # every token is one parcel's patch: per-parcel token sequences (latent_fc) exist

    @property
    def value_block(self) -> int:
        """Timepoints over which every token mask is constant, from timepoint 0: a patch."""
        return self.config.patch_size

    def masks_from_seeds(self, seeds: list[int], num_parcels: int, mask_ratio: float, masking: str) -> Tensor:
        """One mask_BL per seed (`brainlm.masking.seeded_masks`)."""
        return seeded_masks(seeds, num_parcels, self.config.num_patches, mask_ratio, masking)

    def value_mask(self, mask_BL: Tensor, num_parcels: int) -> np.ndarray:
        """Which values of each window a token mask hides: [B, R, T] bool."""
        return value_mask(mask_BL, num_parcels, mask_BL.shape[-1] // num_parcels, self.config.patch_size)

    def token_parcel_counts(self, num_parcels: int) -> Tensor:
        """[L, R]: how many values of each parcel each token holds (P for the parcel's own N tokens)."""
        N = self.config.num_patches
        return torch.eye(num_parcels).repeat_interleave(N, dim=0) * self.config.patch_size

    # ------------------------------------------------------------------ masking

    def random_masking(
        self,
        tokens_BLD: Tensor,
        mask_ratio: float,
        num_parcels: int,
        masking: str | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Remove tokens by `masking` (default: the config's; see `sample_mask`): (kept_BKD, mask_BL,
        ids_restore_BL). `generator` must live on the tokens' device."""
        B, L, _ = tokens_BLD.shape
        R, N = num_parcels, L // num_parcels
        masking = masking or self.config.masking
        mask_BL = sample_mask(B, R, N, mask_ratio, masking, generator, tokens_BLD.device)
        return self._apply_mask(tokens_BLD, mask_BL, num_kept(R, N, mask_ratio, masking))

    @staticmethod
    def _apply_mask(tokens_BLD: Tensor, mask_BL: Tensor, K: int) -> tuple[Tensor, Tensor, Tensor]:
        """Gather the K visible tokens of a bool mask that keeps K per row."""
        B, _, D = tokens_BLD.shape
        # A stable sort of the 0/1 mask puts the kept tokens first, in their original order.
        ids_shuffle_BL = torch.argsort(mask_BL.to(torch.uint8), dim=1, stable=True)
        ids_restore_BL = torch.argsort(ids_shuffle_BL, dim=1)
        kept_BKD = torch.gather(tokens_BLD, 1, ids_shuffle_BL[:, :K, None].expand(B, K, D))
        return kept_BKD, mask_BL, ids_restore_BL

    @staticmethod
    def _check_mask(mask_BL: Tensor, batch: int, num_tokens: int) -> tuple[Tensor, int]:
        """A caller's mask ([L] or [B, L], bool or 0/1) as (bool [B, L], K); rows must mask as many tokens."""
        if mask_BL.ndim == 1:
            mask_BL = mask_BL[None]
        if mask_BL.shape[-1] != num_tokens or mask_BL.shape[0] not in (1, batch) or mask_BL.ndim != 2:
            raise DimensionError(
                f"mask_BL must be [{batch}, {num_tokens}] (batch, parcels x patches); got {tuple(mask_BL.shape)}"
            )
        mask_BL = (mask_BL != 0).expand(batch, num_tokens).contiguous()
        counts_B = mask_BL.sum(1)
        if bool((counts_B != counts_B[0]).any()):
            raise InputError(
                f"every row of mask_BL must mask the same number of tokens; got counts {counts_B.tolist()}"
            )
        return mask_BL, num_tokens - int(counts_B[0])

    # ------------------------------------------------------------------ encoder, decoder, loss

    def forward_encoder(
        self,
        signal_BRT: Tensor,
        coords_R3: Tensor,
        mask_ratio: float | None = None,
        *,
        mask_BL: Tensor | None = None,
        generator: torch.Generator | None = None,
        tr: float | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Embed, mask, encode CLS + visible tokens: (latent_B1KD, mask_BL, ids_restore_BL).

        `mask_BL`, when given, decides the mask (then `mask_ratio` and `generator` are unused)."""
        B, R, _ = self._check_inputs(signal_BRT, coords_R3)
        tokens_BLD = self._embed(signal_BRT, coords_R3, tr)
        if mask_BL is None:
            ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio
            kept_BKD, mask_BL, ids_restore_BL = self.random_masking(tokens_BLD, ratio, R, generator=generator)
        else:
            mask_BL, K = self._check_mask(mask_BL.to(tokens_BLD.device), B, tokens_BLD.shape[1])
            kept_BKD, mask_BL, ids_restore_BL = self._apply_mask(tokens_BLD, mask_BL, K)

        x_B1KD = torch.cat([self.cls_token.expand(B, -1, -1), kept_BKD], dim=1)
        for block in self.blocks:
            x_B1KD = block(x_B1KD)
        return self.norm(x_B1KD), mask_BL, ids_restore_BL

    def forward_decoder(
        self,
        latent_B1KD: Tensor,
        ids_restore_BL: Tensor,
        coords_R3: Tensor,
        prior_BLP: Tensor | None = None,
        mask_BL: Tensor | None = None,
        tr: float | None = None,
    ) -> Tensor:
        """Mask tokens in, unshuffle, add decoder positions, decode all tokens: pred_BLP.

        With `prior_BLP` (and `mask_BL`), the masked tokens also embed their prior patch and the head's output is
        added to the prior."""
        x_B1KE = self.decoder_embed(latent_B1KD)
        B, L = ids_restore_BL.shape
        K, E = x_B1KE.shape[1] - 1, x_B1KE.shape[2]
        x_BLE = torch.cat([x_B1KE[:, 1:], self.mask_token.expand(B, L - K, E)], dim=1)
        x_BLE = torch.gather(x_BLE, 1, ids_restore_BL[:, :, None].expand(B, L, E))  # unshuffle
        if prior_BLP is not None:
            x_BLE = x_BLE + mask_BL[:, :, None].to(x_BLE.dtype) * self.decoder_prior_embed(prior_BLP.to(x_BLE.dtype))
        N = L // coords_R3.shape[0]
        x_BLE = x_BLE + self._pos_embed(
            coords_R3, N, self.decoder_spatial_embed, self.decoder_parcel_embed, E, tr, self.decoder_tr_embed
        )
        x_B1LE = torch.cat([x_B1KE[:, :1], x_BLE], dim=1)

        R = coords_R3.shape[0]
        for block in self.decoder_blocks:
            x_B1LE = block(x_B1LE, R) if isinstance(block, FactorizedBlock) else block(x_B1LE)
        pred_BLP = self.decoder_pred(self.decoder_norm(x_B1LE))[:, 1:]  # drop CLS
        return pred_BLP if prior_BLP is None else pred_BLP + prior_BLP.to(pred_BLP.dtype)

    def forward_loss(self, signal_BRT: Tensor, pred_BLP: Tensor, mask_BL: Tensor) -> Tensor:
        """Mean squared error over the removed tokens only (targets per-patch normalised if norm_target)."""
        target_BLP = self.patchify(signal_BRT)
        if self.config.norm_target:
            mean_BL1 = target_BLP.mean(dim=-1, keepdim=True)
            var_BL1 = target_BLP.var(dim=-1, keepdim=True)
            target_BLP = (target_BLP - mean_BL1) / (var_BL1 + 1e-6) ** 0.5
        loss_BL = (pred_BLP - target_BLP).pow(2).mean(dim=-1)
        mask_BL = mask_BL.to(loss_BL.dtype)
        return (loss_BL * mask_BL).sum() / mask_BL.sum().clamp(min=1)

    def forward(
        self,
        signal_BRT: Tensor,
        coords_R3: Tensor,
        mask_ratio: float | None = None,
        *,
        mask_BL: Tensor | None = None,
        generator: torch.Generator | None = None,
        context: tuple[Tensor, Tensor] | None = None,
        tr: float | None = None,
    ) -> MAEOutput:
        """Masked reconstruction of `signal_BRT` ([B, R, T]) given parcel coordinates in MNI mm ([R, 3]); `context`
        (context_cov_BRR, context_n_B): each window's recording context, for a prior that reads it; `tr`: the
        window's TR in seconds, read by a TR-aware model (`model.time_unit_s`)."""
        latent_B1KD, mask_BL, ids_restore_BL = self.forward_encoder(
            signal_BRT, coords_R3, mask_ratio, mask_BL=mask_BL, generator=generator, tr=tr
        )
        prior_BLP = None
        if self.decoder_prior_embed is not None:
            prior_BLP = self.prior_patches(signal_BRT, coords_R3, mask_BL, context)
        pred_BLP = self.forward_decoder(latent_B1KD, ids_restore_BL, coords_R3, prior_BLP, mask_BL, tr)
        return MAEOutput(self.forward_loss(signal_BRT, pred_BLP, mask_BL), pred_BLP, mask_BL)

    # ------------------------------------------------------------------ inference

    def encode(self, signal_BRT: Tensor, coords_R3: Tensor, tr: float | None = None) -> tuple[Tensor, Tensor]:
        """Embeddings of every token, no masking, tokens in identity order: (cls_BD, tokens_BLD).

        Deterministic in eval mode. It follows the module's mode: in train mode dropout (if
        `model.dropout` > 0) applies, as fine-tuning wants; call `.eval()` for fixed embeddings."""
        B, _, _ = self._check_inputs(signal_BRT, coords_R3)
        x_B1LD = torch.cat([self.cls_token.expand(B, -1, -1), self._embed(signal_BRT, coords_R3, tr)], dim=1)
        for block in self.blocks:
            x_B1LD = block(x_B1LD)
        x_B1LD = self.norm(x_B1LD)
        return x_B1LD[:, 0], x_B1LD[:, 1:]

    def cls_attention(
        self,
        signal_BRT: Tensor,
        coords_R3: Tensor,
        *,
        include_cls: bool = False,
        return_tokens: bool = False,
        tr: float | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """CLS attention of every encoder layer and head over the L tokens, unmasked: attn_BYHL.

        Row = the CLS query's softmax over all 1 + L keys (CLS first), computed from the CLS query alone
        (no L x L matrix) while the blocks run their fused attention. By default the CLS column is
        dropped without renormalising, so a row sums to 1 - (CLS-to-CLS weight); `include_cls=True`
        returns the full [B, Y, H, 1 + L] rows, which sum to 1. `return_tokens=True` also returns the
        tokens `encode` would (tokens_BLD) from the same pass: (attn, tokens_BLD)."""
        B, _, _ = self._check_inputs(signal_BRT, coords_R3)
        x_B1LD = torch.cat([self.cls_token.expand(B, -1, -1), self._embed(signal_BRT, coords_R3, tr)], dim=1)
        rows = []
        for block in self.blocks:
            x_B1LD, weights_BH1L = block(x_B1LD, return_cls_attention=True)
            rows.append(weights_BH1L)
        attn_BYH1L = torch.stack(rows, dim=1)
        attn = attn_BYH1L if include_cls else attn_BYH1L[..., 1:]
        return (attn, self.norm(x_B1LD)[:, 1:]) if return_tokens else attn

    # ------------------------------------------------------------------ accounting

    def num_params(self, trainable_only: bool = False) -> int:
        """Parameter count (buffers such as the Fourier frequencies excluded)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def flops_per_sample(self, mask_ratio: float | None = None, num_parcels: int | None = None) -> float:
        """Training FLOPs per sample (forward + backward = 3 x forward) at the config's window length.

        Counts every matmul (2 FLOPs per multiply-add) and attention's QK^T and AV, in the encoder
        (1 + K tokens) and the decoder (1 + L tokens); norms, softmax, activations and the Gaussian prior's
        solves are left out."""
        c = self.config
        R = num_parcels or c.num_parcels
        N, P, D, E = c.num_patches, c.patch_size, c.hidden_size, c.decoder_hidden_size
        L = R * N
        K = num_kept(R, N, c.mask_ratio if mask_ratio is None else mask_ratio, c.masking)

        def spatial(width: int) -> int:
            if c.spatial_encoding == "linear":
                return 2 * R * 3 * width
            enc = self.spatial_embed
            F = enc.freqs_F3.shape[0]
            return 2 * R * (3 * F + 2 * F * width + width * width)

        def blocks(S: int, width: int, mlp: int, layers: int) -> int:
            linear = 2 * S * width * (3 * width + width + 2 * mlp)  # qkv, proj, fc1, fc2
            conv = 2 * S * width * c.value_conv_kernel  # the depthwise value convolution, if any
            return layers * (linear + conv + 2 * 2 * S * S * width)  # + QK^T and AV over all heads

        head = E * (E // 2) + (E // 2) * P if c.decoder_head == "mlp" else E * P

        forward = (
            2 * L * P * D  # patch embedding (before masking, as MAE)
            + spatial(D)
            + blocks(1 + K, D, c.mlp_dim, c.num_layers)
            + 2 * (1 + K) * D * E  # decoder_embed
            + spatial(E)
            + blocks(1 + L, E, c.decoder_mlp_dim, c.decoder_num_layers)
            + 2 * (1 + L) * head  # decoder_pred
            + (2 * (L - K) * P * E if self.decoder_prior_embed is not None else 0)  # the prior patch embedding
        )
        return 3.0 * forward

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups: decay the matmul weights; not the norms, biases, embeddings or tokens."""
        no_decay_prefixes = ("spatial_embed.", "decoder_spatial_embed.")
        no_decay_names = {
            "cls_token",
            "mask_token",
            "parcel_embed",
            "decoder_parcel_embed",
            "tr_embed",
            "decoder_tr_embed",
        }
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if p.ndim < 2 or name in no_decay_names or name.startswith(no_decay_prefixes):
                no_decay.append(p)
            else:
                decay.append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    # ------------------------------------------------------------------ files

    def save_pretrained(
        self,
        path: str | os.PathLike,
        scaling: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Write model.safetensors + config.json (+ scaling.json, extra.json when given) into folder `path`,
        atomically (`io.save_model`)."""
        io.save_model(path, self, self.config.to_dict(), scaling, extra)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> BrainLM:
        """Load a folder written by `save_pretrained` (or a registry URI, `models:/NAME@ALIAS` / `runs:/...`, once
        `brainlm` is imported), in eval mode, with `.scaling` / `.extra` (or None)."""
        return io.load_model(cls, ModelConfig, path, map_location).eval()
