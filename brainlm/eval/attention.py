"""``brainlm attention``: CLS attention per parcel, averaged within groups (a condition, a phenotype ...).

Per window: the CLS token's attention mass on each parcel's tokens in the last encoder layer, averaged over
heads; per group: the mean over its windows. Reported beside each group's mean signal variance per parcel
(a model-free map of where the signal is), with the top parcels and their networks."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainlm.eval.common import autocast, load_context, recordings, table, write_metrics
from brainlm.eval.perturb import top_report
from brainlm.exceptions import InputError
from brainlm.model import grid
from brainlm.model.inference import tr_of

log = logging.getLogger(__name__)


@torch.no_grad()
def parcel_attention(
    model, windows_BRW: np.ndarray, coords_R3: torch.Tensor, batch: int = 32, tr: float | None = None
) -> np.ndarray:
    """[B, R]: last-layer, head-mean CLS attention on each parcel's tokens."""
    model.eval()
    R = windows_BRW.shape[1]
    out = []
    for i in range(0, len(windows_BRW), batch):
        x = torch.from_numpy(windows_BRW[i : i + batch]).to(coords_R3.device)
        with autocast(coords_R3.device):
            a_BHL = model.cls_attention(x, coords_R3, **tr_of(model, tr))[:, -1].float().cpu()
        out.append(grid.parcel_attention(model, a_BHL.mean(dim=1), R))
    return torch.cat(out).numpy()


def attention(
    model: str,
    shards: str,
    out: str | Path,
    group_by: str = "condition",
    split: str = "test",
    max_windows: int = 512,
    device: str | None = None,
) -> dict[str, Any]:
    from brainlm import plots

    ctx = load_context(model, shards, device)
    atlas = ctx.manifest.atlas
    groups: dict[str, list[np.ndarray]] = {}
    recs = recordings(ctx, split)
    known = sorted({k for r in recs for k in (*r.meta, *r.meta.get("phenotypes", {}))} - {"phenotypes"})
    if group_by not in known:
        raise InputError(
            f"--group-by {group_by!r}: the recordings of the {split!r} split have no such field; "
            f"expected one of {', '.join(known)}"
        )
    for rec in recs:
        value = rec.meta.get(group_by, rec.meta.get("phenotypes", {}).get(group_by))
        groups.setdefault(str(value), []).append(rec.windows_NRW)
    out = Path(out)
    metrics: dict[str, Any] = {"group_by": group_by, "split": split, "groups": {}}
    rows = []
    for name, parts in sorted(groups.items()):
        windows = np.concatenate(parts)[:max_windows]
        attn = parcel_attention(ctx.model, windows, ctx.coords_R3, tr=ctx.manifest.tr).mean(axis=0)
        variance = windows.var(axis=2).mean(axis=0)
        top = top_report(attn, atlas.networks, atlas.labels, 0.1)
        metrics["groups"][name] = {
            "windows": len(windows),
            "attention": attn.round(6).tolist(),
            "signal_variance": variance.round(6).tolist(),
            **top,
        }
        plots.brain_figure(
            attn,
            atlas.coords(),
            out / f"attention_{group_by}-{name}.png",
            f"CLS attention per parcel, {group_by}={name}",
        )
        rows.append(
            {
                "group": name,
                "windows": len(windows),
                "top networks": ", ".join(f"{k} {v}" for k, v in list(top.get("top_networks", {}).items())[:3]),
            }
        )
    names = sorted(groups)
    if len(names) == 2:
        a, b = (np.array(metrics["groups"][n]["attention"]) for n in names)
        diff = b - a
        metrics["difference"] = {
            "of": f"{names[1]} - {names[0]}",
            **top_report(np.abs(diff), atlas.networks, atlas.labels, 0.1),
        }
        plots.brain_figure(
            np.abs(diff), atlas.coords(), out / "attention_difference.png", f"|CLS attention {names[1]} - {names[0]}|"
        )
    write_metrics(out, metrics)
    log.info(table(rows, ["group", "windows", "top networks"], f"CLS attention by {group_by} ({split} split)"))
    return metrics
