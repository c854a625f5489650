"""``brainlm networks``: zero-shot functional network identification: can a parcel's network be read off one
recording's representation, using labels from other recordings only?

Protocol. Each recording of the split gives every parcel a feature vector, computed from that recording's
non-overlapping windows alone. The recordings are split in two halves, reference and query (sorted by id,
alternating); the parcels into stratified folds. For each fold, a k-nearest-neighbour classifier (cosine
distance, k = 5) is fitted on the reference recordings' features of the training parcels and predicts the
network of the held-out parcels in every query recording. A parcel is never in its own training fold and a
query recording never in the reference set; accuracy is over (query recording, parcel) pairs. Networks with
fewer parcels than folds and "unassigned" are left out.

Features per (recording, parcel):
    attention    the CLS token's attention to the parcel's tokens, summed over its patches, averaged over
                 the recording's windows: one value per encoder layer x head, in units of uniform attention
    tokens       the parcel's encoder output tokens averaged over its patches and the windows ([D])
    raw          the parcel's time series over the recording's windows (z-scored): the raw-signal baseline
    fc_rows      the parcel's correlations with every other kept parcel in the recording (FC baseline)
    coords       the parcel's MNI coordinates: what location alone gives
    attention_random, tokens_random
                 the random-weights control (``common.random_weights``): the same features from the same
                 architecture with untrained weights; what the trained features gain over them is what
                 pretraining added

The paper reports kNN on CLS attention at 58.8% against raw data at 39.2% (7 networks). Raw time series do
not transfer across recordings (resting-state time courses are not aligned between scans), which is what this
protocol asks of every feature; within one recording they would be a connectivity measure in disguise.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainlm.eval.common import (
    autocast,
    comparison_table,
    load_context,
    random_weights,
    recordings,
    table,
    write_metrics,
)
from brainlm.exceptions import InputError
from brainlm.model import grid
from brainlm.model.inference import tr_of
from brainlm.protocol import UnitScores, compare

log = logging.getLogger(__name__)

UNLABELLED = {"unassigned", "none", "", "nan"}
MODEL_FEATURES = ("attention", "tokens")
CONTROL_FEATURES = tuple(f"{m}_random" for m in MODEL_FEATURES)
BASELINE_FEATURES = ("raw", "fc_rows", "coords")
FEATURES = (*MODEL_FEATURES, *CONTROL_FEATURES, *BASELINE_FEATURES)


def folds(labels: np.ndarray, n_splits: int = 5, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified folds over parcels: every parcel is tested exactly once, never trained on in that fold."""
    from sklearn.model_selection import StratifiedKFold

    return list(StratifiedKFold(n_splits, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels))


def reference_mask(n_recordings: int) -> np.ndarray:
    """Alternate recordings between the reference (True) and query (False) halves."""
    if n_recordings < 2:
        raise InputError(f"network identification needs at least 2 recordings in the split, got {n_recordings}")
    return np.arange(n_recordings) % 2 == 0


def knn_across_recordings(
    features_NPF: np.ndarray, labels: np.ndarray, splits, reference: np.ndarray, k: int = 5
) -> np.ndarray:
    """Predicted labels [query recordings, P]: fitted on reference recordings x training parcels only."""
    from sklearn.neighbors import KNeighborsClassifier

    ref, query = features_NPF[reference], features_NPF[~reference]
    pred = np.empty(query.shape[:2], dtype=object)
    for train, test in splits:
        x = ref[:, train].reshape(-1, ref.shape[-1])
        y = np.tile(labels[train], len(ref))
        clf = KNeighborsClassifier(n_neighbors=min(k, len(y)), metric="cosine", algorithm="brute").fit(x, y)
        pred[:, test] = clf.predict(query[:, test].reshape(-1, query.shape[-1])).reshape(len(query), len(test))
    return pred


@torch.no_grad()
def recording_features(
    model,
    windows_NRW: np.ndarray,
    coords_R3: torch.Tensor,
    parcels: np.ndarray,
    batch: int = 32,
    tr: float | None = None,
):
    """Every feature of one recording for the kept parcels: {name: [P, F]}."""
    model.eval()
    R = windows_NRW.shape[1]
    attn, tokens = [], []
    for i in range(0, len(windows_NRW), batch):
        x = torch.from_numpy(windows_NRW[i : i + batch]).to(coords_R3.device)
        with autocast(coords_R3.device):
            a_BYHL, t_BLD = model.cls_attention(x, coords_R3, return_tokens=True, **tr_of(model, tr))
        a_BYHL, t_BLD = a_BYHL.float().cpu(), t_BLD.float().cpu()
        B, Y, H, L = a_BYHL.shape
        attn.append(grid.parcel_attention(model, a_BYHL.reshape(B, Y * H, L), R))  # [B, Y*H, R]
        tokens.append(grid.parcel_tokens(model, t_BLD, R))  # [B, R, D]
    a_FR = torch.cat(attn).mean(dim=0) * R  # 1 = the attention a parcel would get if CLS attended uniformly
    signal = np.concatenate(list(windows_NRW), axis=1)[parcels]  # [P, windows x W]
    signal = (signal - signal.mean(axis=1, keepdims=True)) / (signal.std(axis=1, keepdims=True) + 1e-8)
    fc = np.corrcoef(signal)
    np.fill_diagonal(fc, 0.0)
    return {
        "attention": a_FR.T[parcels].numpy(),
        "tokens": torch.cat(tokens).mean(dim=0)[parcels].numpy(),
        "raw": signal,
        "fc_rows": np.nan_to_num(fc),
    }


def short_names(names: list[str]) -> dict[str, str]:
    """Column headers: the first 4 letters of each CamelCase word (SomatomotorDorsal -> SomaDors), unique."""
    import re

    short = {n: "".join(w[:4] for w in re.findall(r"[A-Z][a-z]*|[a-z]+|\d+", n)) or n for n in names}
    return short if len(set(short.values())) == len(names) else {n: n for n in names}


def networks(
    model: str,
    shards: str,
    out: str | Path,
    split: str = "test",
    label_key: str = "network",
    max_recordings: int = 60,
    k: int = 5,
    n_splits: int = 5,
    device: str | None = None,
) -> dict[str, Any]:
    from brainlm import plots

    ctx = load_context(model, shards, device)
    atlas = ctx.manifest.atlas
    if label_key != "network":
        raise InputError(f"--labels {label_key!r}: the atlas carries one label set, 'network'")
    if not atlas.networks:
        raise InputError(f"the atlas {atlas.name} has no network labels (add a 'network' column to the atlas table)")
    labels_all = np.array(atlas.networks, dtype=object)
    names, counts = np.unique(labels_all, return_counts=True)
    kept = {n for n, c in zip(names, counts, strict=True) if c >= n_splits and str(n).lower() not in UNLABELLED}
    left_out = sorted(str(n) for n in names if n not in kept)
    if len(kept) < 2:
        raise InputError(f"fewer than two networks with >= {n_splits} parcels: {dict(zip(names, counts, strict=True))}")
    parcels = np.array([i for i, n in enumerate(labels_all) if n in kept])
    labels = labels_all[parcels]
    recs = recordings(ctx, split, limit=max_recordings)
    reference = reference_mask(len(recs))
    control = random_weights(ctx.model)
    per_rec = []
    for r in recs:
        features = recording_features(ctx.model, r.windows_NRW, ctx.coords_R3, parcels, tr=ctx.manifest.tr)
        untrained = recording_features(control, r.windows_NRW, ctx.coords_R3, parcels, tr=ctx.manifest.tr)
        per_rec.append(features | {f"{m}_random": untrained[m] for m in MODEL_FEATURES})
    coords = atlas.coords()[parcels]
    feats = {name: np.stack([f[name] for f in per_rec]) for name in FEATURES if name != "coords"}
    feats["coords"] = np.broadcast_to(coords, (len(recs), *coords.shape))
    splits = folds(labels, n_splits)
    order = sorted(kept)
    truth = np.tile(labels, ((~reference).sum(), 1))
    chance = float(max(np.mean(labels == n) for n in order))
    results, preds = {}, {}
    for name in FEATURES:
        pred = knn_across_recordings(feats[name], labels, splits, reference, k)
        preds[name] = pred
        results[name] = {
            "accuracy": float(np.mean(pred == truth)),
            "per_network": {n: float(np.mean(pred[truth == n] == n)) for n in order},
        }
    best_model = max(MODEL_FEATURES, key=lambda m: results[m]["accuracy"])
    best_baseline = max(BASELINE_FEATURES, key=lambda m: results[m]["accuracy"])
    # Intervals over query recordings and their subjects (paired: every feature is scored on the same ones).
    per_recording = UnitScores({m: (preds[m] == truth).mean(axis=1) for m in FEATURES}, higher_is_better=True)
    query_subjects = [r.subject for r, ref in zip(recs, reference, strict=True) if not ref]
    comparisons = {"model_vs_best_baseline": compare(per_recording, query_subjects, best_model, best_baseline)}
    for m in MODEL_FEATURES:
        comparisons[f"{m}_vs_random_weights"] = compare(per_recording, query_subjects, m, f"{m}_random")
    pretraining_adds = {m: comparisons[f"{m}_vs_random_weights"].to_json() for m in MODEL_FEATURES}
    winner = comparisons["model_vs_best_baseline"].winner
    out = Path(out)
    for name in ("attention", "tokens", best_baseline):
        plots.confusion_figure(
            truth.ravel(),
            preds[name].ravel(),
            order,
            out / f"confusion_{name}.png",
            f"networks from {name}: accuracy {results[name]['accuracy']:.2f}",
        )
    metrics = {
        "split": split,
        "recordings": {"reference": int(reference.sum()), "query": int((~reference).sum())},
        "parcels": len(parcels),
        "networks": order,
        "left_out": left_out,
        "chance_majority": chance,
        "k": k,
        "folds": n_splits,
        "features": {
            "attention": f"CLS attention per encoder layer x head ({per_rec[0]['attention'].shape[1]} values), "
            "summed over the parcel's patches, averaged over the recording's windows",
            "tokens": "encoder output tokens averaged over the parcel's patches and the recording's windows",
        },
        "results": results,
        "winner": winner,
        "best_model_feature": best_model,
        "best_baseline": best_baseline,
        "comparisons": {k: c.to_json() for k, c in comparisons.items()},
        "pretraining_adds": pretraining_adds,
    }
    write_metrics(out, metrics)
    short = short_names(order)
    rows = [
        {"features": m, "accuracy": r["accuracy"], **{short[n]: r["per_network"][n] for n in order}}
        for m, r in results.items()
    ]
    rows.append({"features": "chance", "accuracy": chance})
    log.info(
        table(
            rows,
            ["features", "accuracy", *[short[n] for n in order]],
            f"network identification, {len(parcels)} parcels in {len(order)} networks, kNN (k={k}) fitted on "
            f"{int(reference.sum())} reference recordings, tested on {int((~reference).sum())} others, "
            f"{n_splits}-fold CV over parcels; model features: attention, tokens (*_random: the same with untrained "
            "weights)",
        )
    )
    log.info(comparison_table(list(comparisons.values()), "accuracy"))
    return metrics
