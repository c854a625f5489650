"""``brainlm fingerprint``: what a recording-level representation knows about whose scan it is and what was done in it.

Every recording of the split is summarised once, from all of its non-overlapping windows:
    cls, mean      the model's CLS / mean-token embedding averaged over the windows
    latent_fc      the model's latent connectivity (parcel x parcel correlation of its encoder tokens, averaged over
                   the windows, Fisher z, upper triangle)
    *_random       the same from the same architecture with untrained weights (``common.random_weights``): what the
                   pooling gives without pretraining
    fc             the baseline: the parcel x parcel correlation of the recording's signal, Fisher z, upper triangle
Features are centred across the split's recordings (each feature minus its mean), which removes what every scan
shares; ``fc_uncentred`` is FC as Finn et al. (2015) used it.

(a) Fingerprinting: each recording's nearest other recording of the split (Pearson correlation of the features);
    accuracy = how often it is the same subject's. Needs subjects with at least 2 recordings in the split; each
    recording with a same-subject partner is a query, every other recording a candidate.
(b) Label decoding (``label``: a metadata column such as condition, or a phenotype): logistic regression on each
    representation, cross-validated by subject (a subject's recordings never in training and test at once), balanced
    accuracy. ``split`` may name several splits ("val,test": every subject the model was not trained on).
Each model representation is compared with FC and with its random-weights control, with paired bootstrap intervals
over recordings and subjects (``brainlm.protocol.intervals``); a winner only when they exclude 0.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from brainlm.eval.common import comparison_table, load_context, random_weights, recordings, table, write_metrics
from brainlm.exceptions import InputError
from brainlm.model.inference import fisher_z, window_features
from brainlm.protocol import UnitScores, compare

log = logging.getLogger(__name__)

MODEL_REPRESENTATIONS = ("cls", "mean", "latent_fc")


def fc_features(windows_NRW: np.ndarray) -> np.ndarray:
    x = np.concatenate(list(windows_NRW), axis=1).astype(np.float64)
    c = np.corrcoef(x)
    return fisher_z(c[np.triu_indices_from(c, k=1)])


def model_representations(model) -> tuple[str, ...]:
    """The representations a model has: latent_fc needs each parcel's own tokens (not a ViT-MAE release's)."""
    return MODEL_REPRESENTATIONS if model.parcel_tokens else tuple(p for p in MODEL_REPRESENTATIONS if p != "latent_fc")


def representations(model, windows_NRW: np.ndarray, coords, tr: float | None = None) -> dict[str, np.ndarray]:
    """One vector per representation for one recording (its windows pooled)."""
    out = {p: window_features(model, windows_NRW, coords, p, tr=tr).mean(axis=0) for p in model_representations(model)}
    if "latent_fc" in out:
        out["latent_fc"] = fisher_z(out["latent_fc"])
    return out


def identify(features_NF: np.ndarray, subjects: np.ndarray) -> np.ndarray:
    """Per recording with a same-subject partner: 1 if its most correlated other recording is its subject's."""
    z = features_NF - features_NF.mean(axis=1, keepdims=True)
    z /= np.linalg.norm(z, axis=1, keepdims=True) + 1e-12
    sim = z @ z.T
    np.fill_diagonal(sim, -np.inf)
    nearest = sim.argmax(axis=1)
    return (subjects[nearest] == subjects).astype(np.float64)


def decode(features_NF: np.ndarray, labels: np.ndarray, subjects: np.ndarray, folds: int) -> np.ndarray:
    """Per recording: 1 if its label is predicted right by a logistic regression trained on other subjects'
    recordings (GroupKFold by subject), balanced by the caller."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    right = np.zeros(len(labels))
    for train, test in GroupKFold(folds).split(features_NF, labels, subjects):
        est = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000, class_weight="balanced"))
        est.fit(features_NF[train], labels[train])
        right[test] = est.predict(features_NF[test]) == labels[test]
    return right


def balanced_weights(labels: np.ndarray) -> np.ndarray:
    """Per recording: 1 / (its class's count x classes), so a weighted mean of correctness is balanced accuracy."""
    names, counts = np.unique(labels, return_counts=True)
    count = dict(zip(names, counts, strict=True))
    return np.array([len(labels) / (len(names) * count[v]) for v in labels])


def fingerprint(
    model: str,
    shards: str,
    out: str | Path,
    split: str = "test",
    label: str | None = None,
    folds: int = 5,
    device: str | None = None,
) -> dict[str, Any]:
    ctx = load_context(model, shards, device)
    recs = [r for part in split.split(",") for r in recordings(ctx, part.strip())]  # "val,test": held-out subjects
    subjects = np.array([r.subject for r in recs], dtype=object)
    names, counts = np.unique(subjects, return_counts=True)
    if (counts >= 2).sum() < 2:
        raise InputError(
            f"fingerprinting needs at least 2 subjects with 2 or more recordings in the {split!r} split; it has "
            f"{len(recs)} recording(s) of {len(names)} subject(s), {int((counts >= 2).sum())} with several: use a "
            "cohort with repeated runs (or sessions) per subject"
        )
    control = random_weights(ctx.model)
    reps = model_representations(ctx.model)
    feats: dict[str, list[np.ndarray]] = {}
    for r in recs:
        row = representations(ctx.model, r.windows_NRW, ctx.coords_R3, ctx.manifest.tr)
        row |= {
            f"{k}_random": v for k, v in representations(control, r.windows_NRW, ctx.coords_R3, ctx.manifest.tr).items()
        }
        row["fc"] = fc_features(r.windows_NRW)
        for k, v in row.items():
            feats.setdefault(k, []).append(v)
    X = {k: np.stack(v) for k, v in feats.items()}
    X = {k: v - v.mean(axis=0) for k, v in X.items()} | {"fc_uncentred": X["fc"]}
    methods = list(X)
    queries = np.isin(subjects, names[counts >= 2])
    ident = UnitScores({m: identify(X[m], subjects)[queries] for m in methods}, higher_is_better=True)
    q_subjects = subjects[queries]
    metrics: dict[str, Any] = {
        "split": split,
        "recordings": len(recs),
        "subjects": len(names),
        "queries": int(queries.sum()),
        "chance": float(np.mean([(counts[names == s][0] - 1) / (len(recs) - 1) for s in q_subjects])),
        "fingerprinting": {m: float(ident.score(m)) for m in methods},
    }
    comparisons = [compare(ident, q_subjects, m, "fc") for m in reps]
    comparisons += [compare(ident, q_subjects, m, f"{m}_random") for m in reps]
    metrics["fingerprinting_comparisons"] = [c.to_json() for c in comparisons]
    rows = [{"representation": m, "fingerprinting": metrics["fingerprinting"][m]} for m in methods]
    if label:
        values = [r.meta.get(label, ctx.manifest.subjects.get(r.subject, {}).get(label)) for r in recs]
        keep = np.array([v is not None and str(v) != "nan" for v in values])
        labels = np.array([str(v) for v in values], dtype=object)
        per_class = {c: len(set(subjects[keep][labels[keep] == c])) for c in sorted(set(labels[keep]))}
        if len(per_class) < 2 or min(per_class.values()) < 2:
            raise InputError(
                f"--label {label!r}: decoding is cross-validated by subject and needs 2 or more classes, each in at "
                f"least 2 subjects; the {split!r} recordings have {per_class} (subjects per class): add splits "
                "(--split val,test) or choose another label"
            )
        k = min(folds, len(set(subjects[keep])))
        w = balanced_weights(labels[keep])
        dec = UnitScores(
            {m: decode(X[m][keep], labels[keep], subjects[keep], k) * w for m in methods}, higher_is_better=True
        )
        metrics["decoding"] = {"label": label, "classes": sorted(set(labels[keep])), "folds": k}
        metrics["decoding"] |= {"balanced_accuracy": {m: float(dec.score(m)) for m in methods}}
        dec_cmp = [compare(dec, subjects[keep], m, "fc") for m in reps]
        dec_cmp += [compare(dec, subjects[keep], m, f"{m}_random") for m in reps]
        metrics["decoding"]["comparisons"] = [c.to_json() for c in dec_cmp]
        for row in rows:
            row[f"{label} (balanced acc.)"] = metrics["decoding"]["balanced_accuracy"][row["representation"]]
    write_metrics(out, metrics)
    columns = ["representation", "fingerprinting", *([f"{label} (balanced acc.)"] if label else [])]
    title = (
        f"{len(recs)} {split} recordings of {len(names)} subjects: subject identification by nearest recording "
        f"({metrics['queries']} queries, chance {metrics['chance']:.3f})"
    )
    if label:
        title += f"; {label} decoded by logistic regression, {metrics['decoding']['folds']}-fold by subject"
    log.info(table(rows, columns, title))
    log.info(comparison_table(comparisons, "fingerprinting accuracy"))
    if label:
        log.info(comparison_table(dec_cmp, f"{label} balanced accuracy"))
    return metrics
