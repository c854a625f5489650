"""``brainlm finetune``: predict a subject phenotype from recordings, with the baselines in the same table.

Protocol: subject-level splits from the manifest (train fits, val picks the epoch, test reports); every
recording is cut into non-overlapping windows, each labelled with its subject's value; a recording's
prediction is the mean over its windows (class probabilities for classification). Targets are transformed
with statistics of the training subjects (z-score, min-max, or log + min-max as the paper did), and the
error is reported in that space: MSE mean +- std over seeds (accuracy and AUC for classification).

In the same table, on the same recordings:
- chance:    the training mean (regression) or the majority class
- svr_raw:   an RBF SVR / SVC on the raw signals of each recording's first window (the paper's baseline)
- fc_ridge:  ridge / logistic regression on functional connectivity (upper triangle of the parcel
             correlation matrix, Fisher z), the baseline that third parties found hard to beat
- probe:     ridge / logistic regression on the frozen pretrained CLS embedding
- probe_latent_fc: the same on the frozen model's latent connectivity (parcel x parcel correlation of the
             encoder tokens; ``common.latent_connectivity``): what the representation holds beyond its pooled
             embedding
- *_random:  the random-weights control (``common.random_weights``, on by default): the same head (and
             fine-tuning) and the same probes on the architecture with untrained weights. What a probe keeps with
             them, the pooling and the linear model gave it; the difference is what pretraining added.

The verdicts: the model (probe_mlp or finetuned) against the best simple baseline (chance, svr_raw, fc_ridge), and
each model representation against its random-weights control, each margin with paired bootstrap intervals over
test recordings and over test subjects (``brainlm.protocol.intervals``); a winner only when both exclude 0.

About 450 lines in one file on purpose: the protocol reads in order (data, head training, baselines, verdicts),
and every part is used by this command and the fine-tuning sweep only.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from brainlm.eval.common import (
    Context,
    Recording,
    autocast,
    comparison_table,
    embed_windows,
    latent_connectivity,
    load_context,
    random_weights,
    recordings,
    table,
    write_metrics,
)
from brainlm.exceptions import ConfigError, InputError, NonFiniteLossError
from brainlm.model import BrainLM
from brainlm.model.heads import BrainLMForPrediction, Transform
from brainlm.protocol import UnitScores, best, compare
from brainlm.scores import r2_score

log = logging.getLogger(__name__)

TRANSFORMS = ("zscore", "minmax", "logminmax", "none")


@dataclass
class FinetuneConfig:
    target: str
    """Phenotype column (participants.tsv) to predict."""
    task: str = "regression"
    """regression | classification."""
    transform: str = "zscore"
    """Target transform for regression: zscore | minmax | logminmax | none (fitted on training subjects)."""
    freeze: bool = False
    """Frozen probe: only the head trains (else full fine-tuning)."""
    pooling: str = "cls"
    """Embedding the head reads: cls | mean (of the tokens)."""
    head_hidden: int | None = None
    """Head width (default: the encoder width)."""
    head_layers: int = 2
    """Linear layers in the head."""
    dropout: float = 0.4
    """Dropout before each head layer (the paper: 40%)."""
    lr: float = 1e-3
    """Head learning rate."""
    backbone_lr_scale: float = 0.1
    """Full fine-tuning: the backbone's lr is lr x this."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    epochs: int = 20
    """Passes over the training windows; the epoch with the best validation error is kept."""
    batch_size: int = 16
    """Windows per step."""
    seeds: int = 3
    """Repeats with different seeds (mean +- std)."""
    min_subjects: int = 6
    """Fewest labelled training subjects to go on with."""
    control: bool = True
    """The random-weights control: the same head (and fine-tuning) and probes on the same architecture with untrained
    weights, beside the pretrained model (what pretraining adds); --no-control skips it."""

    device: str | None = None
    """cpu | cuda | cuda:N (default: CUDA when available, else the CPU); bf16 autocast on a GPU."""

    def __post_init__(self) -> None:
        if self.task not in ("regression", "classification"):
            raise ConfigError(f"`--task` must be regression or classification, got {self.task!r}")
        if self.transform not in TRANSFORMS:
            raise ConfigError(f"`--transform` must be one of {', '.join(TRANSFORMS)}, got {self.transform!r}")
        if self.pooling not in ("cls", "mean"):
            raise ConfigError(f"`--pooling` must be cls or mean, got {self.pooling!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"`--dropout` must be in [0, 1), got {self.dropout}")
        if self.lr <= 0 or self.weight_decay < 0 or self.backbone_lr_scale < 0:
            raise ConfigError(
                f"`--lr` must be > 0 and `--weight-decay`, `--backbone-lr-scale` >= 0; got {self.lr}, "
                f"{self.weight_decay}, {self.backbone_lr_scale}"
            )
        if self.head_hidden is not None and self.head_hidden < 1:
            raise ConfigError(f"`--head-hidden` must be at least 1, got {self.head_hidden}")
        for name in ("epochs", "batch_size", "seeds", "head_layers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`--{name.replace('_', '-')}` must be at least 1, got {getattr(self, name)}")


@dataclass
class SplitData:
    recordings: list[Recording]
    y: np.ndarray  # per recording: transformed value, or class index
    windows_NRW: np.ndarray = field(repr=False, default=None)
    owner: np.ndarray = field(repr=False, default=None)  # window -> recording index


@dataclass
class FinetuneData:
    ctx: Context
    cfg: FinetuneConfig
    splits: dict[str, SplitData]
    transform: Transform | None
    classes: list[str] | None


def _labels(ctx: Context, recs: list[Recording], target: str) -> list[Any]:
    out = []
    for r in recs:
        value = ctx.manifest.subjects.get(r.subject, {}).get(target, r.meta.get("phenotypes", {}).get(target))
        out.append(None if value is None or (isinstance(value, float) and math.isnan(value)) else value)
    return out


def load_data(ctx: Context, cfg: FinetuneConfig) -> FinetuneData:
    """Labelled windows of train/val/test; refuses targets that do not exist or have too few subjects."""
    columns = sorted({k for p in ctx.manifest.subjects.values() for k in p})
    if cfg.target not in columns:
        raise InputError(f"--target {cfg.target!r} is not a phenotype of these shards; columns: {', '.join(columns)}")
    raw: dict[str, tuple[list[Recording], list[Any]]] = {}
    for split in ("train", "val", "test"):
        if not ctx.manifest.num_samples(split):
            raise InputError(
                f"the {split!r} split of {ctx.root} is empty; fine-tuning needs train, val and test subjects "
                "(rebuild with --val-frac/--test-frac > 0 or --splits)"
            )
        recs = recordings(ctx, split)
        labels = _labels(ctx, recs, cfg.target)
        keep = [i for i, v in enumerate(labels) if v is not None]
        raw[split] = ([recs[i] for i in keep], [labels[i] for i in keep])
    n_train = len({r.subject for r in raw["train"][0]})
    if n_train < cfg.min_subjects or not raw["val"][0] or not raw["test"][0]:
        raise InputError(
            f"--target {cfg.target!r}: {n_train} labelled training subjects (need {cfg.min_subjects}), "
            f"{len(raw['val'][0])} val and {len(raw['test'][0])} test recordings with a value"
        )
    transform, classes = None, None
    if cfg.task == "classification":
        classes = sorted({str(v) for v in raw["train"][1]})
        if len(classes) < 2:
            raise InputError(f"--target {cfg.target!r} has a single class in training: {classes}")
        encode = {c: i for i, c in enumerate(classes)}

        def to_y(values: list[Any]) -> np.ndarray:
            unseen = sorted({str(v) for v in values} - set(classes))
            if unseen:
                raise InputError(f"--target {cfg.target!r}: classes {unseen} do not occur in training")
            return np.array([encode[str(v)] for v in values])
    else:
        try:
            train_values = np.array(raw["train"][1], dtype=np.float64)
        except ValueError:
            raise InputError(
                f"--target {cfg.target!r} is not numeric (e.g. {raw['train'][1][0]!r}); use --task classification"
            ) from None
        transform = Transform.fit(cfg.transform, train_values)

        def to_y(values: list[Any]) -> np.ndarray:
            return transform(np.array(values, dtype=np.float64))

    splits = {}
    for split, (recs, values) in raw.items():
        windows = np.concatenate([r.windows_NRW for r in recs])
        owner = np.concatenate([np.full(len(r.windows_NRW), i) for i, r in enumerate(recs)])
        splits[split] = SplitData(recs, to_y(values), windows, owner)
    return FinetuneData(ctx, cfg, splits, transform, classes)


# -- the model ------------------------------------------------------------------------------------------------


def _predict(
    model: nn.Module, data: SplitData, coords: torch.Tensor, classification: bool, tr: float | None, batch: int = 64
) -> np.ndarray:
    """Per recording: mean window prediction (or mean class probabilities)."""
    model.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(data.windows_NRW), batch):
            with autocast(coords.device):
                o = model(torch.from_numpy(data.windows_NRW[i : i + batch]).to(coords.device), coords, tr).float()
            outs.append((torch.softmax(o, dim=-1) if classification else o[:, 0]).cpu())
    per_window = torch.cat(outs).numpy()
    return np.stack([per_window[data.owner == i].mean(axis=0) for i in range(len(data.recordings))])


def scores(pred: np.ndarray, y: np.ndarray, classification: bool) -> dict[str, float]:
    if classification:
        from sklearn.metrics import roc_auc_score

        acc = float((pred.argmax(axis=1) == y).mean())
        try:
            auc = roc_auc_score(y, pred[:, 1]) if pred.shape[1] == 2 else roc_auc_score(y, pred, multi_class="ovr")
        except ValueError:  # a single class in the test split
            auc = float("nan")
        return {"accuracy": acc, "auc": float(auc)}
    mse = float(((pred - y) ** 2).mean())
    r = float(np.corrcoef(pred, y)[0, 1]) if pred.std() > 0 and y.std() > 0 else 0.0
    return {"mse": mse, "r2": r2_score(pred, y), "pearson_r": r}


def train_one(
    data: FinetuneData, seed: int, report: Callable[[int, dict[str, float]], None] | None = None
) -> tuple[BrainLMForPrediction, dict[str, float], list[dict[str, float]], np.ndarray]:
    """Train one head (and backbone, unless frozen); returns the model at its best validation epoch, its test
    scores, the per-epoch history and its test predictions (one per recording). ``report(epoch, {"val_loss": ...})``
    is called after every epoch (Ray Tune's hook)."""
    cfg, ctx = data.cfg, data.ctx
    classification = cfg.task == "classification"
    torch.manual_seed(seed)
    model = BrainLMForPrediction(
        copy.deepcopy(ctx.model),
        len(data.classes) if classification else 1,
        cfg.pooling,
        cfg.head_hidden,
        cfg.head_layers,
        cfg.dropout,
        cfg.freeze,
    ).to(ctx.device)
    groups = [{"params": list(model.head.parameters()), "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    if not cfg.freeze:
        for g in model.backbone.param_groups(cfg.weight_decay):
            groups.append({**g, "lr": cfg.lr * cfg.backbone_lr_scale})
    opt = torch.optim.AdamW(groups)
    train, val = data.splits["train"], data.splits["val"]
    target = torch.from_numpy(train.y[train.owner]).to(ctx.device)
    target = target.long() if classification else target.float()
    loss_fn = nn.CrossEntropyLoss() if classification else nn.MSELoss()
    rng = np.random.default_rng(seed)
    best, best_state, history = math.inf, None, []
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = rng.permutation(len(train.windows_NRW))
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            with ctx.autocast():
                out = model(ctx.tensor(train.windows_NRW[idx]), ctx.coords_R3, ctx.manifest.tr).float()
            loss = loss_fn(out if classification else out[:, 0], target[torch.as_tensor(idx, device=ctx.device)])
            opt.zero_grad()
            loss.backward()
            opt.step()
        val_pred = _predict(model, val, ctx.coords_R3, classification, ctx.manifest.tr)
        val_scores = scores(val_pred, val.y, classification)
        val_loss = -val_scores["accuracy"] if classification else val_scores["mse"]
        history.append({"epoch": epoch, "val_loss": val_loss, **{f"val_{k}": v for k, v in val_scores.items()}})
        if report:
            report(epoch, history[-1])
        if val_loss < best:
            best, best_state = val_loss, copy.deepcopy(model.state_dict())
    if best_state is None:
        raise NonFiniteLossError(
            f"the validation loss was not finite in any of {cfg.epochs} epochs (lr {cfg.lr}); lower --lr"
        )
    model.load_state_dict(best_state)
    test = data.splits["test"]
    pred = _predict(model, test, ctx.coords_R3, classification, ctx.manifest.tr)
    return model, scores(pred, test.y, classification), history, pred


def unit_scores(pred: np.ndarray, y: np.ndarray, classification: bool) -> np.ndarray:
    """Per test recording: whether its class was right (classification) or its squared error (regression); the
    table's accuracy / MSE is their mean, and the intervals resample them."""
    return (pred.argmax(axis=1) == y).astype(np.float64) if classification else (pred - y) ** 2


# -- baselines ------------------------------------------------------------------------------------------------


def fc_features(rec: Recording) -> np.ndarray:
    """Upper triangle of the parcel correlation matrix over the recording's windows, Fisher z."""
    x = np.concatenate(list(rec.windows_NRW), axis=1).astype(np.float64)
    c = np.corrcoef(x)
    iu = np.triu_indices_from(c, k=1)
    return np.arctanh(np.clip(c[iu], -0.999999, 0.999999))


SIMPLE_BASELINES = ("chance", "svr_raw", "fc_ridge")  # the bar: what needs no pretrained model
PROBES = ("probe", "probe_latent_fc")  # linear probes of the frozen model's representations


def baselines(data: FinetuneData, control: BrainLM | None = None) -> dict[str, np.ndarray]:
    """Test predictions (one per recording) of the simple baselines and the linear probes; with ``control`` (the
    random-weights model) also the probes of its representations (``probe_random``, ``probe_latent_fc_random``)."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.linear_model import LogisticRegressionCV, RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC, SVR

    ctx, classification = data.ctx, data.cfg.task == "classification"
    train, test = data.splits["train"], data.splits["test"]
    models = {"": ctx.model, **({"_random": control} if control is not None else {})}
    tr = ctx.manifest.tr
    features = {"svr_raw": lambda r: r.windows_NRW[0].ravel(), "fc_ridge": fc_features}
    for suffix, m in models.items():
        features[f"probe{suffix}"] = lambda r, m=m: embed_windows(m, r.windows_NRW, ctx.coords_R3, tr=tr)[0].mean(0)
        if m.parcel_tokens:  # a ViT-MAE release's tokens span several parcels: no latent connectivity
            features[f"probe_latent_fc{suffix}"] = lambda r, m=m: latent_connectivity(
                m, r.windows_NRW, ctx.coords_R3, tr=tr
            )
    out = {}
    if classification:
        counts = np.bincount(train.y, minlength=len(data.classes))
        out["chance"] = np.tile(counts / counts.sum(), (len(test.y), 1)) + 1e-9 * np.arange(len(data.classes))
    else:
        out["chance"] = np.full(len(test.y), train.y.mean())
    for name, feat in features.items():
        x_train = np.stack([feat(r) for r in train.recordings])
        x_test = np.stack([feat(r) for r in test.recordings])
        if name == "svr_raw":
            svm = CalibratedClassifierCV(SVC(random_state=0), ensemble=False) if classification else SVR()
            est = make_pipeline(StandardScaler(), svm)
        elif classification:
            est = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=8, max_iter=2000))
        else:
            est = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 5, 15)))
        est.fit(x_train, train.y)
        out[name] = est.predict_proba(x_test) if classification else est.predict(x_test)
    return out


# -- the command ----------------------------------------------------------------------------------------------


def save_finetuned(model: BrainLMForPrediction, data: FinetuneData, path: str | Path) -> None:
    """The fine-tuned model folder: backbone + head like a pretrained one, plus the fine-tuning config, the target
    transform and the classes in extra.json."""
    ctx = data.ctx
    model.save_pretrained(
        path,
        scaling=ctx.model.scaling,
        extra={
            **(ctx.model.extra or {}),
            "finetune": asdict(data.cfg),
            "transform": asdict(data.transform) if data.transform else None,
            "classes": data.classes,
        },
    )


def _seeds(data: FinetuneData, name: str) -> tuple[list[dict[str, Any]], np.ndarray, BrainLMForPrediction]:
    """Train one head per seed: the per-seed test scores, the per-recording unit score averaged over seeds, and the
    model of the seed with the best validation error."""
    classification = data.cfg.task == "classification"
    test_y = data.splits["test"].y
    runs, units, best = [], [], None
    for seed in range(data.cfg.seeds):
        net, test_scores, history, pred = train_one(data, seed)
        val_losses = [h["val_loss"] for h in history]
        runs.append({"seed": seed, **test_scores, "best_epoch": int(np.argmin(val_losses) + 1)})
        units.append(unit_scores(pred, test_y, classification))
        if best is None or min(val_losses) < best[0]:
            best = (min(val_losses), net)
        log.info(f"{name}: seed {seed + 1}/{data.cfg.seeds} done (best epoch {runs[-1]['best_epoch']})")
    return runs, np.mean(units, axis=0), best[1]


def finetune(model: str, shards: str, out: str | Path, cfg: FinetuneConfig) -> dict[str, Any]:
    ctx = load_context(model, shards, cfg.device)
    data = load_data(ctx, cfg)
    classification = cfg.task == "classification"
    keys = ["accuracy", "auc"] if classification else ["mse", "r2", "pearson_r"]
    name = "probe_mlp" if cfg.freeze else "finetuned"
    runs, unit, best_net = _seeds(data, name)
    summary = {
        name: {k: float(np.mean([r[k] for r in runs])) for k in keys}
        | {f"{k}_std": float(np.std([r[k] for r in runs])) for k in keys}
    }
    units = {name: unit}
    control = random_weights(ctx.model) if cfg.control else None
    if control is not None:  # the same head (and fine-tuning) from random weights: what pretraining adds
        control_data = dataclasses.replace(data, ctx=dataclasses.replace(ctx, model=control))
        c_runs, units[f"{name}_random"], _ = _seeds(control_data, f"{name}_random")
        summary[f"{name}_random"] = {k: float(np.mean([r[k] for r in c_runs])) for k in keys} | {
            f"{k}_std": float(np.std([r[k] for r in c_runs])) for k in keys
        }
    test = data.splits["test"]
    for base, pred in baselines(data, control).items():
        summary[base] = scores(pred, test.y, classification) | {f"{k}_std": 0.0 for k in keys}
        units[base] = unit_scores(pred, test.y, classification)
    unit_set = UnitScores(units, higher_is_better=classification)
    subjects = [r.subject for r in test.recordings]
    bar = best(unit_set, list(SIMPLE_BASELINES))
    comparisons = {"model_vs_best_baseline": compare(unit_set, subjects, name, bar)}
    if control is not None:
        for a in (name, *(p for p in PROBES if p in summary)):
            comparisons[f"{a}_vs_random_weights"] = compare(unit_set, subjects, a, f"{a}_random")
    primary = keys[0]
    out = Path(out)
    save_finetuned(best_net, data, out / "model")
    metrics = {
        "target": cfg.target,
        "task": cfg.task,
        "transform": cfg.transform,
        "config": asdict(cfg),
        "subjects": {s: len({r.subject for r in d.recordings}) for s, d in data.splits.items()},
        "recordings": {s: len(d.recordings) for s, d in data.splits.items()},
        "seeds": runs,
        "table": summary,
        "best_baseline": bar,
        "comparisons": {k: c.to_json() for k, c in comparisons.items()},
        "winner": comparisons["model_vs_best_baseline"].winner,
        "primary_metric": primary,
        "model_dir": str(out / "model"),
    }
    write_metrics(out, metrics)
    rows = [{"method": m, **{k: f"{v[k]:.4f} +- {v[k + '_std']:.4f}" for k in keys}} for m, v in summary.items()]
    log.info(
        table(
            rows,
            ["method", *keys],
            f"{cfg.target} ({cfg.task}, {cfg.transform if not classification else 'classes ' + str(data.classes)}) "
            f"on {metrics['recordings']['test']} test recordings of {metrics['subjects']['test']} subjects; "
            f"{'higher' if classification else 'lower'} is better",
        )
    )
    log.info(comparison_table(list(comparisons.values()), primary))
    return metrics
