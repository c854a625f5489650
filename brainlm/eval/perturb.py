"""``brainlm perturb``: in-silico perturbation. Learn theta of G(X, theta) so that the model's embedding of
the perturbed source recordings matches the target state's mean embedding, with an L1 penalty on theta;
report where the perturbation concentrates.

    additive     G(X, theta) = X + theta[r, n]        (per parcel and patch, held over the patch's timepoints)
    gain_offset  G(X, theta) = X * (1 + g[r]) + o[r]  (per parcel)

loss = ||mean_b E(G(X_b)) - mean E(target)||^2 / ||mean E(source) - mean E(target)||^2 + l1 * mean|theta|

E is the model's representation of a window (``--pooling``): ``parcels`` (default) keeps the parcel axis, each
parcel's encoder tokens averaged over its patches ([R, D]); ``cls`` and ``mean`` pool to one D-vector. A pooled
D-vector is a weak target: the optimiser reaches it with a small theta spread over every parcel (on the
synthetic cohort, 98% of the way with none of the top parcels in the visual network the task drives), whereas
matching the per-parcel representation puts the perturbation where the states differ (docs/results.md).

The model is frozen; the same theta applies to every source window. Per-parcel magnitude: mean |theta| over
patches (additive) or |g| + |o| (gain_offset). Baseline (model-free): each parcel's standardised difference
in signal variance between target and source windows, ranked the same way.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainlm.eval.common import Context, load_context, parse_where, recordings, table, write_metrics
from brainlm.exceptions import ConfigError
from brainlm.model import grid
from brainlm.model.inference import tr_of

log = logging.getLogger(__name__)


@dataclass
class PerturbConfig:
    source: str = "condition=rest"
    """Metadata filter of the source state (KEY=VALUE[,KEY=VALUE])."""
    target: str = "condition=task"
    """Metadata filter of the target state."""
    form: str = "additive"
    """additive (per parcel and patch) | gain_offset (per parcel)."""
    pooling: str = "parcels"
    """Representation to match: parcels (each parcel's mean token, [R, D]) | cls (the CLS token) | mean (all tokens)."""
    l1: float = 0.01
    """L1 weight on theta (sparsity)."""
    lr: float = 0.05
    """Adam learning rate for theta."""
    steps: int = 200
    """Optimisation steps."""
    split: str = "test"
    """Split whose recordings are perturbed and targeted."""
    max_windows: int = 128
    """Windows per state."""
    top_fraction: float = 0.1
    """Share of parcels reported as the top regions."""

    device: str | None = None
    """cpu | cuda | cuda:N (default: CUDA when available, else the CPU); bf16 autocast on a GPU."""

    def __post_init__(self) -> None:
        if self.pooling not in ("cls", "mean", "parcels"):
            raise ConfigError(f"`--pooling` must be parcels, cls or mean, got {self.pooling!r}")
        if self.form not in ("additive", "gain_offset"):
            raise ConfigError(f"`--form` must be additive or gain_offset, got {self.form!r}")
        if self.steps < 1 or self.l1 < 0 or self.lr <= 0:
            raise ConfigError("`--steps` must be >= 1, `--l1` >= 0 and `--lr` > 0")


def apply(x_BRT: torch.Tensor, theta: torch.Tensor, form: str, patch: int) -> torch.Tensor:
    if form == "additive":  # theta [R, N] held over each patch's timepoints
        return x_BRT + theta.repeat_interleave(patch, dim=1)[None]
    return x_BRT * (1 + theta[None, :, :1]) + theta[None, :, 1:2]  # theta [R, 2]: gain, offset


def magnitude(theta: torch.Tensor, form: str) -> np.ndarray:
    t = theta.detach().abs()
    return (t.mean(dim=1) if form == "additive" else t.sum(dim=1)).numpy()


def optimise(
    ctx: Context, source: np.ndarray, target: np.ndarray, cfg: PerturbConfig, report=None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Learn theta; returns it and how far the embedding moved (reached = 1 - d_after / d_before)."""
    model = ctx.model.eval().requires_grad_(False)
    R, block = source.shape[1], model.value_block
    N = source.shape[2] // block
    x = ctx.tensor(source)

    def embedding(signal_BRT: torch.Tensor) -> torch.Tensor:
        cls_BD, tokens_BLD = model.encode(signal_BRT, ctx.coords_R3, **tr_of(model, ctx.manifest.tr))
        if cfg.pooling == "parcels":  # [R, D]: each parcel's tokens averaged over its patches and the windows
            return grid.parcel_tokens(model, tokens_BLD, R).mean(dim=0)
        return (cls_BD if cfg.pooling == "cls" else tokens_BLD.mean(dim=1)).mean(dim=0)

    with torch.no_grad():
        goal, start = embedding(ctx.tensor(target)), embedding(x)
    scale = float(((start - goal) ** 2).sum()) or 1.0
    theta = torch.zeros((R, N) if cfg.form == "additive" else (R, 2), device=ctx.device, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=cfg.lr)
    torch.manual_seed(0)
    for step in range(1, cfg.steps + 1):
        emb = embedding(apply(x, theta, cfg.form, block))
        match = ((emb - goal) ** 2).sum() / scale
        loss = match + cfg.l1 * theta.abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if report and (step % 20 == 0 or step == cfg.steps):
            report(step, {"match": float(match), "l1": float(theta.abs().mean())})
    with torch.no_grad():
        final = embedding(apply(x, theta, cfg.form, block))
    after = float(((final - goal) ** 2).sum())
    return theta.detach().cpu(), {
        "distance_before": scale,
        "distance_after": after,
        "reached": 1 - after / scale,
        "mean_abs_theta": float(theta.detach().abs().mean()),
    }


def variance_baseline(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per parcel: (var_target - var_source) / pooled std of the per-window variances (model-free)."""
    vs, vt = source.var(axis=2), target.var(axis=2)
    return np.abs(vt.mean(0) - vs.mean(0)) / np.sqrt((vt.var(0) + vs.var(0)) / 2 + 1e-12)


def top_report(values_R: np.ndarray, networks: list[str] | None, labels: list[str], fraction: float) -> dict[str, Any]:
    n_top = max(1, round(fraction * len(values_R)))
    top = np.argsort(-values_R)[:n_top]
    out: dict[str, Any] = {"top_parcels": [labels[i] for i in top]}
    if networks:
        nets = np.array(networks)
        counts = {n: int((nets[top] == n).sum()) for n in sorted(set(networks))}
        out["top_networks"] = {n: c for n, c in sorted(counts.items(), key=lambda kv: -kv[1]) if c}
        out["network_mean"] = {n: float(values_R[nets == n].mean()) for n in sorted(set(networks))}
        out["top_share"] = {n: c / n_top for n, c in counts.items()}
        out["base_rate"] = {n: float(np.mean(nets == n)) for n in sorted(set(networks))}
    return out


def perturb(model: str, shards: str, out: str | Path, cfg: PerturbConfig) -> dict[str, Any]:
    from brainlm import plots

    ctx = load_context(model, shards, cfg.device)
    atlas = ctx.manifest.atlas

    def windows(expr: str) -> np.ndarray:
        recs = recordings(ctx, cfg.split, where=parse_where(expr))
        return np.concatenate([r.windows_NRW for r in recs])[: cfg.max_windows]

    source, target = windows(cfg.source), windows(cfg.target)
    theta, reach = optimise(ctx, source, target, cfg)
    mag = magnitude(theta, cfg.form)
    model_top = top_report(mag, atlas.networks, atlas.labels, cfg.top_fraction)
    base_top = top_report(variance_baseline(source, target), atlas.networks, atlas.labels, cfg.top_fraction)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "theta.npy", theta.numpy())
    plots.brain_figure(
        mag, atlas.coords(), out / "perturbation_brain.png", f"|theta| per parcel: {cfg.source} -> {cfg.target}"
    )
    if atlas.networks:
        plots.bar_figure(
            model_top["network_mean"], out / "perturbation_networks.png", "mean |theta| per network", "|theta|"
        )
    metrics = {
        "config": asdict(cfg),
        "source_windows": len(source),
        "target_windows": len(target),
        **reach,
        "magnitude": mag.round(6).tolist(),
        "model": model_top,
        "baseline_variance": base_top,
    }
    write_metrics(out, metrics)
    log.info(
        f"perturbation {cfg.source} -> {cfg.target} ({cfg.form}, l1 {cfg.l1}): the embedding moved "
        f"{reach['reached']:.1%} of the way to the target; {len(source)} source, {len(target)} target windows"
    )
    if atlas.networks:
        rows = [
            {
                "network": n,
                "model top share": model_top["top_share"][n],
                "baseline top share": base_top["top_share"][n],
                "base rate": model_top["base_rate"][n],
            }
            for n in sorted(model_top["top_share"], key=lambda n: -model_top["top_share"][n])
        ]
        log.info(
            table(
                rows,
                ["network", "model top share", "baseline top share", "base rate"],
                f"networks of the top {cfg.top_fraction:.0%} parcels",
            )
        )
    return metrics
