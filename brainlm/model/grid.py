"""Tokens to parcels, for any model: BrainLM's tokens are one parcel's patch each; the ViT-MAE releases' tokens are
image patches over several parcels. Both models say how many values of each parcel each token holds
(``token_parcel_counts``, [L, R]), and per-parcel quantities follow from that alone.

Shapes: B batch, L tokens, R parcels, D width, Y layers, H heads.
"""

from __future__ import annotations

from torch import Tensor


def parcel_attention(model, attn_BL: Tensor, num_parcels: int) -> Tensor:
    """Attention mass on each parcel [B, R] (leading axes kept): each token's weight shared among its parcels by
    their share of its values (padding-only tokens give theirs to none). BrainLM: the sum over the parcel's tokens."""
    counts_LR = model.token_parcel_counts(num_parcels).to(attn_BL)
    share_LR = counts_LR / counts_LR.sum(dim=1, keepdim=True).clamp(min=1)
    return attn_BL @ share_LR


def parcel_tokens(model, tokens_BLD: Tensor, num_parcels: int) -> Tensor:
    """Each parcel's token embedding [B, R, D]: the mean of the tokens holding its values, weighted by how many they
    hold. BrainLM: the mean over the parcel's own tokens."""
    counts_LR = model.token_parcel_counts(num_parcels).to(tokens_BLD)
    weights_RL = (counts_LR / counts_LR.sum(dim=0, keepdim=True)).T
    return weights_RL @ tokens_BLD
