"""``brainlm networks``: zero-shot functional network identification from CLS attention.

Features per parcel: for every window, the CLS token's attention to the parcel's tokens in the last encoder
layer, summed over the parcel's patches, one value per head; a parcel's feature vector is that value over
all windows x heads, each (window, head) column z-scored across parcels. The model never saw the labels.
Protocol: k-nearest-neighbour classification of the network labels (cosine distance, k = 5), stratified
5-fold cross-validation over parcels (a parcel is never in its own training fold), networks with fewer
parcels than folds and "unassigned" left out. Baselines on the same parcels and folds: the raw time series
(each parcel's signal over the same windows, z-scored per window) and functional-connectivity rows (each
parcel's mean correlation with every other parcel).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainlm.eval.common import load_context, recordings, table, write_metrics
from brainlm.exceptions import InputError

UNLABELLED = {"unassigned", "none", "", "nan"}


def folds(labels: np.ndarray, n_splits: int = 5, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified folds over parcels: every parcel is tested exactly once, never trained on in that fold."""
    from sklearn.model_selection import StratifiedKFold

    return list(StratifiedKFold(n_splits, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels))


def knn_cv(features: np.ndarray, labels: np.ndarray, splits, k: int = 5) -> np.ndarray:
    """Out-of-fold kNN predictions for every parcel."""
    from sklearn.neighbors import KNeighborsClassifier

    pred = np.empty(len(labels), dtype=object)
    for train, test in splits:
        clf = KNeighborsClassifier(n_neighbors=min(k, len(train)), metric="cosine", algorithm="brute")
        clf.fit(features[train], labels[train])
        pred[test] = clf.predict(features[test])
    return pred


def _zscore_columns(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-8)


@torch.no_grad()
def attention_features(
    model, windows_BRW: np.ndarray, coords_R3: torch.Tensor, layer: int = -1, batch: int = 32
) -> np.ndarray:
    """[R, windows x heads]: CLS attention mass on each parcel's tokens, per window and head."""
    model.eval()
    N = model.config.num_patches
    cols = []
    for i in range(0, len(windows_BRW), batch):
        attn_BYHL = model.cls_attention(torch.from_numpy(windows_BRW[i : i + batch]), coords_R3)
        a_BHL = attn_BYHL[:, layer] if layer >= -attn_BYHL.shape[1] else attn_BYHL.mean(dim=1)
        B, H, L = a_BHL.shape
        cols.append(a_BHL.reshape(B, H, L // N, N).sum(dim=-1).reshape(B * H, -1))  # [B*H, R]
    return _zscore_columns(torch.cat(cols).numpy().T)


def raw_features(windows_BRW: np.ndarray) -> np.ndarray:
    x = windows_BRW - windows_BRW.mean(axis=2, keepdims=True)
    x = x / (x.std(axis=2, keepdims=True) + 1e-8)
    return x.transpose(1, 0, 2).reshape(windows_BRW.shape[1], -1)


def fc_rows(windows_BRW: np.ndarray) -> np.ndarray:
    fc = np.mean([np.corrcoef(w) for w in windows_BRW], axis=0)
    np.fill_diagonal(fc, 0.0)
    return fc


def networks(
    model: str,
    shards: str,
    out: str | Path,
    split: str = "test",
    label_key: str = "network",
    max_windows: int = 256,
    k: int = 5,
    n_splits: int = 5,
) -> dict[str, Any]:
    from brainlm.eval import plots

    ctx = load_context(model, shards)
    atlas = ctx.manifest.atlas
    if label_key != "network":
        raise InputError(f"--labels {label_key!r}: the atlas carries one label set, 'network'")
    if not atlas.networks:
        raise InputError(f"the atlas {atlas.name} has no network labels (add a 'network' column to the atlas table)")
    labels_all = np.array(atlas.networks, dtype=object)
    names, counts = np.unique(labels_all, return_counts=True)
    kept = {n for n, c in zip(names, counts, strict=True) if c >= n_splits and str(n).lower() not in UNLABELLED}
    left_out = sorted(str(n) for n in names if n not in kept)
    parcels = np.array([i for i, n in enumerate(labels_all) if n in kept])
    if len(kept) < 2:
        raise InputError(f"fewer than two networks with >= {n_splits} parcels: {dict(zip(names, counts, strict=True))}")
    windows = np.concatenate([r.windows_NRW for r in recordings(ctx, split)])[:max_windows]
    labels = labels_all[parcels]
    splits = folds(labels, n_splits)
    feats = {
        "attention": attention_features(ctx.model, windows, ctx.coords_R3)[parcels],
        "attention_all_layers": attention_features(ctx.model, windows, ctx.coords_R3, layer=-99)[parcels],
        "raw": raw_features(windows)[parcels],
        "fc_rows": fc_rows(windows)[np.ix_(parcels, parcels)],
    }
    order = sorted(kept)
    chance = float(max(np.mean(labels == n) for n in order))
    results, preds = {}, {}
    for name, x in feats.items():
        pred = knn_cv(x, labels, splits, k)
        preds[name] = pred
        results[name] = {
            "accuracy": float(np.mean(pred == labels)),
            "per_network": {n: float(np.mean(pred[labels == n] == n)) for n in order},
        }
    best_baseline = max(("raw", "fc_rows"), key=lambda m: results[m]["accuracy"])
    winner = max(results, key=lambda m: results[m]["accuracy"])
    out = Path(out)
    plots.confusion_figure(
        labels,
        preds["attention"],
        order,
        out / "confusion_attention.png",
        f"networks from CLS attention: accuracy {results['attention']['accuracy']:.2f}",
    )
    plots.confusion_figure(
        labels,
        preds[best_baseline],
        order,
        out / f"confusion_{best_baseline}.png",
        f"networks from {best_baseline}: accuracy {results[best_baseline]['accuracy']:.2f}",
    )
    metrics = {
        "split": split,
        "windows": len(windows),
        "parcels": len(parcels),
        "networks": order,
        "left_out": left_out,
        "chance_majority": chance,
        "k": k,
        "folds": n_splits,
        "features": "CLS attention, last encoder layer, per head, summed over each parcel's patches; "
        "attention_all_layers averages the layers",
        "results": results,
        "winner": winner,
        "best_baseline": best_baseline,
    }
    write_metrics(out, metrics)
    rows = [
        {"features": m, "accuracy": r["accuracy"], **{n[:10]: r["per_network"][n] for n in order}}
        for m, r in results.items()
    ]
    rows.append({"features": "chance", "accuracy": chance})
    print(
        table(
            rows,
            ["features", "accuracy", *[n[:10] for n in order]],
            f"network identification, {len(parcels)} parcels in {len(order)} networks, kNN (k={k}) "
            f"{n_splits}-fold CV over parcels, {len(windows)} {split} windows; winner: {winner}",
        )
    )
    return metrics
