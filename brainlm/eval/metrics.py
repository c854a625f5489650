"""The evaluation protocol's fixed masks and the masked-reconstruction R^2, accumulated in sums so it can be pooled
across batches and ranks. Pretraining's validation and ``brainlm reconstruct`` share both: the same window of the
same split gets the same mask in either, so a learning curve and the final table measure one thing."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from brainlm.data.loader import sample_seed
from brainlm.model.masking import seeded_masks

MASK_SEED = 20_240_424  # fixed evaluation masks: the same in every run, for every model
MASKING_CODES = {"random": 0, "tube": 1, "parcel": 2, "future": 3}


def fixed_masks(
    indices: int | list[int], num_parcels: int, num_patches: int, ratio: float, masking: str
) -> torch.Tensor:
    """mask_BL of evaluation windows by their index in the split (``indices``: a count means 0 .. count - 1), each
    from its own seed: identical across runs, batchings, world sizes and models of the same shape."""
    return seeded_masks(protocol_seeds(indices, masking), num_parcels, num_patches, ratio, masking)


def protocol_seeds(indices: int | list[int], masking: str) -> list[int]:
    """The mask seed of each evaluation window index."""
    return [
        sample_seed(MASK_SEED, MASKING_CODES[masking], i)
        for i in (range(indices) if isinstance(indices, int) else indices)
    ]


@dataclass
class R2Sums:
    """Sums over masked values: squared error, target, target squared, count. Pooled R^2 = 1 - SSE / SST
    with SST around the pooled target mean (the paper's single R^2 over all masked values, unclipped)."""

    sse: float = 0.0
    s1: float = 0.0
    s2: float = 0.0
    n: float = 0.0

    def add(self, pred_BLP: torch.Tensor, target_BLP: torch.Tensor, mask_BL: torch.Tensor) -> None:
        m = mask_BL.bool()
        pred, target = pred_BLP[m].double(), target_BLP[m].double()
        self.sse += float(((pred - target) ** 2).sum())
        self.s1 += float(target.sum())
        self.s2 += float((target**2).sum())
        self.n += float(target.numel())

    def tensor(self) -> torch.Tensor:
        return torch.tensor([self.sse, self.s1, self.s2, self.n], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> R2Sums:
        return cls(*(float(v) for v in t))

    @property
    def r2(self) -> float:
        sst = self.s2 - self.s1**2 / max(self.n, 1.0)
        return 1.0 - self.sse / sst if sst > 0 else float("nan")

    @property
    def mse(self) -> float:
        return self.sse / max(self.n, 1.0)
