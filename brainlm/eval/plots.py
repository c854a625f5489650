"""Figures (PNG). matplotlib (Agg) and nilearn's plotting live here and nowhere else."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


@torch.no_grad()
def reconstruction_figure(
    model,
    signal_BRT: torch.Tensor,
    coords_R3: torch.Tensor,
    path: str | Path,
    parcels: int = 4,
    mask_ratio: float | None = None,
    seed: int = 0,
) -> Path:
    """True vs reconstructed time courses of a few parcels of one window; masked patches shaded."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    out = model(signal_BRT[:1].float(), coords_R3.float(), mask_ratio, generator=g)
    R = signal_BRT.shape[1]
    pred_RT = model.unpatchify(out.pred_BLP, R)[0]
    N = model.config.num_patches
    P = model.config.patch_size
    mask_RN = out.mask_BL[0].reshape(R, N)
    rows = np.linspace(0, R - 1, parcels).round().astype(int)
    fig, axes = plt.subplots(parcels, 1, figsize=(9, 1.8 * parcels), sharex=True)
    for ax, r in zip(np.atleast_1d(axes), rows, strict=False):
        ax.plot(signal_BRT[0, r].float().numpy(), color="k", lw=1, label="true")
        ax.plot(pred_RT[r].numpy(), color="tab:red", lw=1, label="reconstructed")
        for n in range(N):
            if mask_RN[r, n]:
                ax.axvspan(n * P, (n + 1) * P, color="tab:red", alpha=0.08)
        ax.set_ylabel(f"parcel {r}")
    np.atleast_1d(axes)[0].legend(loc="upper right", fontsize=8)
    np.atleast_1d(axes)[-1].set_xlabel("timepoint (shaded: masked patches)")
    return _save(fig, path)
