"""The evaluation protocol's fixed masks: one seed per evaluation window and masking strategy, so pretraining's
validation and ``brainlm reconstruct`` give the same window of the same split the same mask, and a learning curve
and the final table measure one thing."""

from __future__ import annotations

import numpy as np
import torch

from brainlm.data.loader import sample_seed
from brainlm.masking import seeded_masks, value_mask

MASK_SEED = 20_240_424  # fixed evaluation masks: the same in every run, for every model
MASKING_CODES = {"random": 0, "tube": 1, "parcel": 2, "future": 3}


def fixed_masks(
    indices: int | list[int], num_parcels: int, num_patches: int, ratio: float, masking: str
) -> torch.Tensor:
    """mask_BL of evaluation windows by their index in the split (``indices``: a count means 0 .. count - 1), each
    from its own seed: identical across runs, batchings, world sizes and models of the same shape."""
    return seeded_masks(protocol_seeds(indices, masking), num_parcels, num_patches, ratio, masking)


def model_masks(model, indices: int | list[int], num_parcels: int, ratio: float, masking: str) -> torch.Tensor:
    """The same fixed masks in the evaluated model's own tokens (``model.masks_from_seeds``): BrainLM's parcel
    patches (= ``fixed_masks``), or a ViT-MAE release's image patches."""
    return model.masks_from_seeds(protocol_seeds(indices, masking), num_parcels, ratio, masking)


def protocol_seeds(indices: int | list[int], masking: str) -> list[int]:
    """The mask seed of each evaluation window index."""
    return [
        sample_seed(MASK_SEED, MASKING_CODES[masking], i)
        for i in (range(indices) if isinstance(indices, int) else indices)
    ]


def time_mask(mask_BL: torch.Tensor, R: int, N: int, P: int) -> np.ndarray:
    """Token mask -> [B, R, T] bool (True = masked timepoint): ``brainlm.masking.value_mask``."""
    return value_mask(mask_BL, R, N, P)
