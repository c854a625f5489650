"""``brainlm embed``: deterministic embeddings per recording (CLS and mean token), averaged over all of its
non-overlapping windows. ``random_weights=True`` writes the random-weights control's embeddings instead (the same
architecture and pooling, untrained weights: ``common.random_weights``), for a downstream analysis to show what
pretraining adds."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from brainlm.eval.common import embed_windows, load_context, recordings, write_metrics
from brainlm.eval.common import random_weights as untrained

log = logging.getLogger(__name__)


def embed(
    model: str,
    shards: str,
    out: str | Path,
    splits: tuple[str, ...] = ("train", "val", "test"),
    device: str | None = None,
    random_weights: bool = False,
) -> dict[str, Any]:
    ctx = load_context(model, shards, device)
    if random_weights:
        ctx.model = untrained(ctx.model)
    rows, cls_all, mean_all = [], [], []
    for split in splits:
        if not ctx.manifest.num_samples(split):
            continue
        for rec in recordings(ctx, split):
            cls, mean = embed_windows(ctx.model, rec.windows_NRW, ctx.coords_R3, tr=ctx.manifest.tr)
            cls_all.append(cls.mean(axis=0))
            mean_all.append(mean.mean(axis=0))
            phenotypes = rec.meta.get("phenotypes", {})
            rows.append(
                {
                    "recording": rec.id,
                    "subject": rec.subject,
                    "condition": rec.meta.get("condition"),
                    "split": split,
                    "windows": len(rec.windows_NRW),
                    **phenotypes,
                }
            )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(
        out / "embeddings.npz",
        cls=np.stack(cls_all),
        mean=np.stack(mean_all),
        recording=np.array([r["recording"] for r in rows]),
    )
    pd.DataFrame(rows).to_csv(out / "embeddings.tsv", sep="\t", index=False)
    metrics = {
        "recordings": len(rows),
        "dim": int(cls_all[0].shape[0]),
        "windows": int(sum(r["windows"] for r in rows)),
        "files": ["embeddings.npz", "embeddings.tsv"],
        "window": ctx.model.config.num_timepoints,
        "weights": "random (the control)" if random_weights else "pretrained",
    }
    write_metrics(out, metrics)
    log.info(
        ("random-weights control: " if random_weights else "")
        + f"embedded {len(rows)} recordings ({metrics['windows']} windows of {metrics['window']} timepoints), "
        f"D={metrics['dim']} -> {out / 'embeddings.npz'} (+ embeddings.tsv)"
    )
    return metrics
