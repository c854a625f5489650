"""What every downstream command shares: load a model and a shard set that belong together, fixed windows,
fixed masks, the summary table and metrics.json."""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainlm.data.loader import fixed_samples
from brainlm.data.shardset import ShardSet, WithShards
from brainlm.exceptions import DimensionError, InputError
from brainlm.model import BrainLM
from brainlm.model.inference import (
    autocast,
    fisher_z,
    model_tr,
    model_trs,
    resolve_device,
    untrained_tr,
    window_features,
)
from brainlm.model.io import REGISTRY_SCHEMES, model_folder
from brainlm.model.load import MODELS, load_model

log = logging.getLogger(__name__)


@dataclass
class Context(WithShards):
    model: BrainLM
    shards: ShardSet
    coords_R3: torch.Tensor
    model_dir: Path | None  # None for a model given as an object
    prior_fitted_on: str | None = None  # set when the decoder's prior is refitted on these shards

    @property
    def device(self) -> torch.device:
        return self.coords_R3.device

    def to(self, device: str | torch.device | None) -> Context:
        """The model and coordinates on ``device`` (None: CUDA when available, else the CPU)."""
        device = resolve_device(device)
        self.model.to(device)
        self.coords_R3 = self.coords_R3.to(device)
        return self

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        """A float32 batch on the context's device."""
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(self.device)

    def autocast(self):
        """bf16 autocast on a GPU; nothing on the CPU (fp32)."""
        return autocast(self.device)


def load_context(
    model_uri: str | Path | BrainLM, shards: str, device: str | torch.device | None = None, refit: bool = False
) -> Context:
    """The model (on ``device``: default CUDA when available) and the shard set it is evaluated on. A model folder
    needs no MLflow; a ``models:/`` or ``runs:/`` URI is fetched from the registry (the [train] extra). The decoder's
    prior is refitted on the shards' training split when the model holds none for their atlas, or with ``refit``
    (a new cohort on an atlas the model has seen: its own statistics rather than the pretraining sets')."""
    if isinstance(model_uri, MODELS):  # a model already loaded in a notebook: a copy, which the refit may change
        model, model_dir, model_uri = copy.deepcopy(model_uri), None, "the model given"
    elif isinstance(model_uri, (str, Path)):
        if str(model_uri).startswith(REGISTRY_SCHEMES):
            from brainlm.tracking.registry import resolve_model

            model_dir = resolve_model(str(model_uri))
        else:
            model_dir = model_folder(model_uri)
        model = load_model(model_dir)
    else:
        raise InputError(
            f"model: expected a BrainLM (from brainlm.load), a model folder or a models:/ / runs:/ URI; got "
            f"{type(model_uri).__name__}"
            + (" (a fine-tuned model: pass its pretrained backbone)" if hasattr(model_uri, "backbone") else "")
        )
    shard_set = ShardSet.open(shards)
    manifest = shard_set.manifest
    R_model, R_data = model.config.num_parcels, manifest.atlas.num_parcels
    trained = (model.extra or {}).get("atlas", {})
    if R_model != R_data and model.config.learned_parcel_embedding:
        raise DimensionError(
            f"the model {model_uri} was trained on {R_model} parcels with a learned per-parcel table "
            f"(model.learned_parcel_embedding) but the shards {shards} have {R_data} ({manifest.atlas.name}); "
            "use shards built with the model's atlas"
        )
    if trained.get("labels") and trained["labels"] != manifest.atlas.labels:
        # The model places parcels by their MNI coordinates, so another atlas is another set of positions.
        log.info(
            f"note: {model_uri} was trained on the atlas {trained.get('name')!r} ({R_model} parcels); the shards use "
            f"{manifest.atlas.name!r} ({R_data} parcels): parcels are placed by their coordinates (transfer)"
        )
    said = untrained_tr(model, manifest.tr)
    if said:
        # Evaluating on another TR is a transfer experiment, not an error; it is said, as another atlas is.
        log.info(
            f"note: {model_uri} was trained at TR {said}; the shards {shards} are at TR {manifest.tr:g} s: "
            "each patch spans another duration (transfer); rebuild the shards with --tr "
            f"{model_tr(model) or model_trs(model)[0]:g} --resample to evaluate at the model's TR"
        )
    coords = torch.tensor(manifest.atlas.coords(), dtype=torch.float32)
    ctx = Context(model, shard_set, coords, model_dir)
    if refit and model.decoder_prior_embed is None:
        raise InputError(f"refit the prior: {model_uri} has no decoder prior (`model.decoder_prior` is none)")
    if model.decoder_prior_embed is not None and (refit or not model.prior_fits(coords)):
        refit_prior(ctx, asked=refit)
    return ctx.to(device)


def refit_prior(ctx: Context, split: str = "train", asked: bool = False) -> None:
    """Fit the decoder's Gaussian prior on the shards' own training windows: its statistics belong to an atlas,
    and on another one they are refitted in closed form from the windows the linear baselines are fitted on
    (without any, the prior falls back to each window's own covariance; ``asked``, as by --refit-prior: an error)."""
    from brainlm.model import prior

    if ctx.manifest.num_samples(split) == 0:
        if asked:
            raise InputError(
                f"refit the prior: the shards {ctx.root} have no {split!r} windows to fit it on; drop --refit-prior "
                "(the model's own prior for this atlas is used) or build the shards with training subjects"
            )
        log.info(f"note: no {split!r} windows to fit the decoder's prior on: it uses each window's own covariance")
        return
    windows, meta = split_windows(ctx, split, prior.FIT_WINDOWS)
    slot = ctx.model.prior_slot(ctx.coords_R3)  # the atlas's own slot when the model has one, else the primary
    ctx.model.fit_prior(windows, ctx.coords_R3, 0 if slot is None else slot)
    subjects = len({m["subject"] for m in meta})
    ctx.prior_fitted_on = f"the {split} split of {ctx.root} ({len(windows)} windows, {subjects} subjects), refitted"
    log.info(f"note: the decoder's Gaussian prior is refitted on {len(windows)} {split!r} windows of these shards")


def split_windows(ctx: Context, split: str, limit: int | None = None) -> tuple[torch.Tensor, list[dict]]:
    """Every crop of a split (first window of each), in manifest order: fixed evaluation windows."""
    if split not in ctx.manifest.splits:
        raise InputError(f"no split {split!r} in {ctx.root}; its splits are {', '.join(sorted(ctx.manifest.splits))}")
    n = ctx.manifest.num_samples(split)
    if n == 0:
        raise InputError(
            f"the {split!r} split of {ctx.root} is empty; rebuild the shards with --test-frac/--val-frac > 0"
        )
    return fixed_samples(ctx.shards, split, min(n, limit or n), ctx.model.config.num_timepoints)


@dataclass
class Recording:
    """One recording's non-overlapping windows (robust-scaled, float32) and its metadata."""

    id: str
    meta: dict[str, Any]
    windows_NRW: np.ndarray

    @property
    def subject(self) -> str:
        return self.meta["subject"]


def recordings(
    ctx: Context, split: str, limit: int | None = None, where: dict[str, str] | None = None
) -> list[Recording]:
    """The recordings of a split as non-overlapping model windows, in a fixed order.

    Crops of a recording are taken in start order, skipping any that overlap the previous one; each crop
    gives ``crop // window`` consecutive windows. ``where`` filters on metadata (e.g. condition=rest)."""
    from brainlm.data.format import decode_signal
    from brainlm.data.loader import read_shard

    W = ctx.model.config.num_timepoints
    crops: dict[str, list[tuple[int, np.ndarray, dict]]] = {}
    for info in ctx.shards.shards(split):
        for raw in read_shard(info.url, info.digests, info.samples, size=info.size):
            meta = json.loads(raw["json"])
            if where and any(str(meta.get(k)) != v for k, v in where.items()):
                continue
            crops.setdefault(meta["recording"], []).append((meta["start"], decode_signal(raw["signal.npy"]), meta))
    out = []
    for rec_id in sorted(crops):
        windows, end, meta = [], -1, None
        for start, signal, m in sorted(crops[rec_id], key=lambda c: c[0]):
            if start < end:
                continue
            end, meta = start + signal.shape[1], m
            windows += [signal[:, i : i + W] for i in range(0, signal.shape[1] - W + 1, W)]
        out.append(Recording(rec_id, meta, np.stack(windows).astype(np.float32)))
        if limit and len(out) == limit:
            break
    if not out:
        raise InputError(f"no recordings in the {split!r} split of {ctx.root}" + (f" with {where}" if where else ""))
    return out


def parse_where(expr: str | None) -> dict[str, str] | None:
    """``condition=rest,subject=01`` -> a metadata filter."""
    if not expr:
        return None
    out = {}
    for part in expr.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise InputError(f"expected KEY=VALUE[,KEY=VALUE] (e.g. condition=rest), got {expr!r}")
        out[key.strip()] = value.strip()
    return out


def embed_windows(
    model: BrainLM, windows_NRW: np.ndarray, coords_R3: torch.Tensor, batch: int = 32, tr: float | None = None
):
    """CLS and mean-token embeddings of each window: ([N, D], [N, D])."""
    return (
        window_features(model, windows_NRW, coords_R3, "cls", batch, tr),
        window_features(model, windows_NRW, coords_R3, "mean", batch, tr),
    )


def latent_connectivity(
    model: BrainLM, windows_NRW: np.ndarray, coords_R3: torch.Tensor, batch: int = 32, tr: float | None = None
):
    """The model's connectivity of a recording: its windows' latent connectivity averaged, then Fisher z
    (``brainlm.model.inference.window_features``)."""
    return fisher_z(window_features(model, windows_NRW, coords_R3, "latent_fc", batch, tr).mean(axis=0))


def random_weights(model: BrainLM, seed: int = 20_240_424) -> BrainLM:
    """The random-weights control: the same architecture, buffers (the prior's statistics, fixed encodings), scaling
    and atlas, with every learned parameter freshly initialised (seeded). Whatever a representation result keeps with
    this model, pooling and baselines gave it; what it loses is what pretraining added."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = type(model)(model.config)
    out = copy.deepcopy(model)
    params = dict(fresh.named_parameters())
    with torch.no_grad():
        for name, p in out.named_parameters():
            p.copy_(params[name])
    return out


def write_metrics(out: str | Path, metrics: dict[str, Any]) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "metrics.json"
    # Strict JSON: a NaN (a parcel with no masked value, a score with no variance) is written as null.
    path.write_text(json.dumps(_finite(metrics), indent=1, default=jsonable, allow_nan=False))
    return path


def _finite(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    if isinstance(v, np.ndarray):
        return _finite(v.tolist())
    if isinstance(v, (float, np.floating)) and not np.isfinite(v):
        return None
    return v


def jsonable(v: Any) -> Any:
    """``json.dumps``'s ``default`` for results files: numpy numbers and arrays as Python's, anything else as its
    text (a run's results are never lost at their last step to a value JSON cannot hold)."""
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


def comparison_table(comparisons: list, metric: str, units: str = "recordings", labels: list[str] | None = None) -> str:
    """The verdicts: each margin (> 0: the first is better) with its paired bootstrap intervals over the evaluated
    units and over subjects (``brainlm.protocol.Comparison``), and the winner, a tie unless both exclude 0."""
    fmt = "[{:+.4f}, {:+.4f}]".format
    labels = labels or [""] * len(comparisons)
    rows = [
        {
            "comparison": f"{label}{c.a} vs {c.b}",
            "margin": c.margin,
            units: fmt(*c.windows),
            "subjects": fmt(*c.subjects) if c.subjects else "- (1 subject)",
            "winner": c.winner,
        }
        for c, label in zip(comparisons, labels, strict=True)
    ]
    return table(
        rows,
        ["comparison", "margin", units, "subjects", "winner"],
        f"margins in {metric} (> 0: the first is better), 95% paired bootstrap intervals over {units} and subjects; "
        "a winner only when both exclude 0",
    )


def table(rows: list[dict[str, Any]], columns: list[str], title: str = "") -> str:
    """A plain-text table; floats with 4 decimals."""

    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = [title] if title else []
    lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
