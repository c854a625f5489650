"""Figures (PNG). matplotlib (Agg) and nilearn's plotting live here and nowhere else."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from brainlm.model.inference import tr_of


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
    mask_BL: torch.Tensor | None = None,
    seed: int = 0,
    tr: float | None = None,
) -> Path:
    """True vs reconstructed time courses of a few parcels of one window (at ``tr``, for a TR-aware model); masked
    values shaded."""
    model.eval()
    R = signal_BRT.shape[1]
    if mask_BL is None:
        mask_BL = model.masks_from_seeds([seed], R, model.config.mask_ratio, model.config.masking)
    device = next(model.parameters()).device
    signal_BRT, mask_BL = signal_BRT[:1].float().cpu(), mask_BL[:1].cpu()
    with torch.no_grad():
        out = model(signal_BRT.to(device), coords_R3.float().to(device), mask_BL=mask_BL.to(device), **tr_of(model, tr))
    pred_RT = model.unpatchify(out.pred_BLP.float(), R)[0].cpu()
    mask_RT = model.value_mask(mask_BL, R)[0]
    rows = np.linspace(0, R - 1, parcels).round().astype(int)
    fig, axes = plt.subplots(parcels, 1, figsize=(9, 1.8 * parcels), sharex=True)
    for ax, r in zip(np.atleast_1d(axes), rows, strict=False):
        ax.plot(signal_BRT[0, r].float().numpy(), color="k", lw=1, label="true")
        ax.plot(pred_RT[r].numpy(), color="tab:red", lw=1, label="reconstructed")
        edges = np.flatnonzero(np.diff(np.r_[0, mask_RT[r].astype(int), 0]))  # starts and ends of masked runs
        for start, end in zip(edges[::2], edges[1::2], strict=True):
            ax.axvspan(start, end, color="tab:red", alpha=0.08)
        ax.set_ylabel(f"parcel {r}")
    np.atleast_1d(axes)[0].legend(loc="upper right", fontsize=8)
    np.atleast_1d(axes)[-1].set_xlabel("timepoint (shaded: masked values)")
    return _save(fig, path)


def distribution_figure(values: dict[str, np.ndarray], path: str | Path, title: str) -> Path:
    """One box per method of per-item values (e.g. per-parcel R^2)."""
    fig, ax = plt.subplots(figsize=(1.4 * len(values) + 2, 3.5))
    names = list(values)
    ax.boxplot([np.asarray(values[n])[np.isfinite(values[n])] for n in names], tick_labels=names, showfliers=False)
    ax.axhline(0, color="grey", lw=0.8, ls="--")
    ax.set_title(title)
    return _save(fig, path)


def confusion_figure(true: np.ndarray, pred: np.ndarray, classes: list[str], path: str | Path, title: str) -> Path:
    """Row-normalised confusion matrix."""
    index = {c: i for i, c in enumerate(classes)}
    m = np.zeros((len(classes), len(classes)))
    for t, p in zip(true, pred, strict=True):
        if p in index:
            m[index[t], index[p]] += 1
    m = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(0.55 * len(classes) + 2.5, 0.55 * len(classes) + 2))
    im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def brain_figure(values_R: np.ndarray, coords_R3: np.ndarray, path: str | Path, title: str) -> Path:
    """Parcel values as markers on a glass brain (nilearn)."""
    from nilearn import plotting

    fig = plt.figure(figsize=(10, 3.2))
    v = np.asarray(values_R, dtype=float)
    plotting.plot_markers(
        v,
        np.asarray(coords_R3),
        node_size=(12 + 60 * (v - v.min()) / (np.ptp(v) + 1e-12)),
        node_cmap="magma",
        title=title,
        figure=fig,
        display_mode="lzry",
        colorbar=True,
    )
    return _save(fig, path)


def bar_figure(values: dict[str, float], path: str | Path, title: str, ylabel: str = "") -> Path:
    fig, ax = plt.subplots(figsize=(0.5 * len(values) + 2.5, 3.2))
    names = list(values)
    ax.bar(range(len(names)), [values[n] for n in names], color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def scaling_figure(rows: list[dict], path: str | Path) -> Path:
    """Validation masked R^2 against training FLOPs (one line per shape) and against parameters (one line per
    budget): which shape wins at which compute."""

    def number(v) -> bool:
        return isinstance(v, (int, float)) and np.isfinite(v)

    done = [r for r in rows if number(r["val_masked_r2"])]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for w, d, m in sorted({(r["width"], r["depth"], r["mask_ratio"]) for r in done}):
        pts = sorted(
            (r["flops"], r["val_masked_r2"]) for r in done if (r["width"], r["depth"], r["mask_ratio"]) == (w, d, m)
        )
        left.plot(*zip(*pts, strict=True), marker="o", label=f"w{w} d{d} m{m}")
    left.set_xscale("log")
    left.set_xlabel("training FLOPs spent")
    left.set_ylabel("validation masked R^2")
    left.set_title("R^2 against compute (one line per shape)")
    left.legend(fontsize=7)
    for b in sorted({r["budget"] for r in done}):
        pts = sorted((r["params"], r["val_masked_r2"]) for r in done if r["budget"] == b)
        right.plot(*zip(*pts, strict=True), marker="o", label=f"budget {b:.2g}")
    right.set_xscale("log")
    right.set_xlabel("parameters")
    right.set_title("R^2 against parameters (one line per budget)")
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return _save(fig, path)


def trials_figure(
    histories: dict[str, list[tuple[float, float]]],
    outcomes: dict[str, str],
    path: str | Path,
    xlabel: str,
    ylabel: str,
    title: str,
    best: str | None = None,
) -> Path:
    """A sweep's metric per trial over its reports: one line per trial, stopped trials dashed, the best bold."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for trial, pts in sorted(histories.items()):
        if not pts:
            continue
        x, y = zip(*pts, strict=True)
        style = {"lw": 2.5, "color": "black", "zorder": 3} if trial == best else {"lw": 1, "alpha": 0.8}
        ls = "--" if outcomes.get(trial) == "stopped" else "-"
        ax.plot(x, y, ls, marker="o", ms=3, label=f"{trial}{' (best)' if trial == best else ''}", **style)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if len(histories) <= 16:
        ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)
