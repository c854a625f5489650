"""Which tokens a masked autoencoder hides: MAE's random masking and BrainLM's structured variants, drawn from a
generator (``sample_mask``) or from one seed per sample (``seeded_masks``, what training, validation and the
evaluation protocol use). mask_BL is bool, True = removed; tokens are parcel-major (token r * N + n). Below the
model, the data loader (which draws each sample's mask from its seed) and the protocol alike."""

from __future__ import annotations

import torch
from torch import Tensor

from brainlm.exceptions import ConfigError

MASKINGS = ("random", "tube", "parcel", "future")


def num_kept(num_parcels: int, num_patches: int, mask_ratio: float, masking: str) -> int:
    """K, visible tokens per sample: the masked unit is a token (random), a patch index (tube, future)
    or a parcel (parcel); int(units * (1 - mask_ratio)) units are kept, as MAE's len_keep."""
    R, N = num_parcels, num_patches
    units = {"random": R * N, "tube": N, "future": N, "parcel": R}[masking]
    kept_units = int(units * (1 - mask_ratio))
    if not 0 < kept_units < units:
        raise ConfigError(
            f"`model.mask_ratio` {mask_ratio} with `model.masking` {masking!r} keeps {kept_units} of {units} "
            f"units ({R} parcels x {N} patches): at least one unit must be kept and one masked"
        )
    return kept_units * {"random": 1, "tube": R, "future": R, "parcel": N}[masking]


def sample_mask(
    batch: int,
    num_parcels: int,
    num_patches: int,
    mask_ratio: float,
    masking: str = "random",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """mask_BL (True = removed) for `batch` samples of R x N tokens, parcel-major, by `masking`.

    random: each sample masks its own random tokens (MAE: argsort of uniform noise); tube: the same random patch
    indices in every parcel; parcel: whole random parcels; future: the last patches of every parcel. Every row
    masks the same count (`num_kept`). `generator` must live on `device`."""
    if masking not in MASKINGS:
        raise ConfigError(f"`model.masking` must be one of {', '.join(MASKINGS)}; got {masking!r}")
    B, R, N = batch, num_parcels, num_patches
    L = R * N
    K = num_kept(R, N, mask_ratio, masking)

    def random_units(units: int, kept: int) -> Tensor:
        """mask_BU with `units - kept` random True per row."""
        ids_shuffle_BU = torch.argsort(torch.rand(B, units, device=device, generator=generator), dim=1)
        mask_BU = torch.ones(B, units, dtype=torch.bool, device=device)
        return mask_BU.scatter_(1, ids_shuffle_BU[:, :kept], False)

    if masking == "random":
        return random_units(L, K)
    if masking == "parcel":
        return random_units(R, K // N)[:, :, None].expand(B, R, N).reshape(B, L)
    # tube: random patch indices; future: the last ones.
    mask_BN = random_units(N, K // R) if masking == "tube" else (torch.arange(N, device=device) >= K // R).expand(B, N)
    return mask_BN[:, None, :].expand(B, R, N).reshape(B, L)


def seeded_masks(
    seeds_B: Tensor | list[int], num_parcels: int, num_patches: int, mask_ratio: float, masking: str = "random"
) -> Tensor:
    """mask_BL with row b drawn from its own seed (`sample_mask` on a CPU generator): a sample's mask depends on its
    seed alone, not on the batch it travels in, the world size or the device."""
    seeds = seeds_B.tolist() if isinstance(seeds_B, Tensor) else list(seeds_B)
    rows = [
        sample_mask(1, num_parcels, num_patches, mask_ratio, masking, generator=torch.Generator().manual_seed(int(s)))
        for s in seeds
    ]
    return torch.cat(rows)


def value_mask(mask_BL: Tensor, num_parcels: int, num_patches: int, patch_size: int):
    """Which values a parcel-major token mask hides: [B, R, N * P] bool numpy (True = masked timepoint)."""
    R, N, P = num_parcels, num_patches, patch_size
    return mask_BL.cpu().reshape(-1, R, N, 1).expand(-1, R, N, P).reshape(-1, R, N * P).numpy().astype(bool)
