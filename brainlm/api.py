"""The public Python API: what ``import brainlm`` gives a lab with a notebook.

    import brainlm
    model = brainlm.load("models:/brainlm-debug@current")      # or a folder, or runs:/RUN_ID/model
    emb_D = model.embed(signal_TR, tr=0.72)                      # numpy in (nilearn's [time, parcels]), numpy out
    table = brainlm.embed_files(model, "fmriprep/", atlas="atlas_dseg.nii.gz")  # NIfTI / BIDS / arrays
    pipe = sklearn.pipeline.make_pipeline(brainlm.BrainLMEmbedder(model, pooling="latent_fc"), RidgeCV())

Loading resolves registry URIs through the tracking layer (MLflow), moves the model to the best device (CUDA when
available) and leaves it in eval mode. Every function here applies the preprocessing the model was trained with
(``brainlm.model.inference``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin  # scikit-learn comes with nilearn, a core dependency

from brainlm.exceptions import InputError
from brainlm.model import BrainLM, BrainLMForPrediction
from brainlm.model import io as model_io
from brainlm.model.inference import Preprocessing, check_pooling, resolve_device
from brainlm.model.load import load_model


def _resolve_registry(uri: str) -> Path:
    from brainlm.tracking.registry import resolve_model

    return resolve_model(uri)


for _prefix in ("models:/", "runs:/"):
    model_io.register_resolver(_prefix, _resolve_registry)


def default_device() -> torch.device:
    """CUDA when a GPU is present, else the CPU."""
    return resolve_device(None)


def load(source: str | Path, device: str | torch.device | None = None) -> BrainLM | BrainLMForPrediction:
    """A model from a folder, ``models:/NAME@ALIAS`` (or ``/VERSION``) or ``runs:/RUN_ID/PATH``, in eval mode on
    ``device`` (default: CUDA when available). A fine-tuned folder (with head.json) loads as BrainLMForPrediction."""
    folder = model_io.local_folder(source)
    if not (folder / model_io.CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"{source}: expected an exported model folder (model.safetensors + config.json), a registry URI like "
            "models:/brainlm-debug@current, or runs:/RUN_ID/model"
        )
    if (folder / "head.json").is_file():
        return BrainLMForPrediction.from_pretrained(folder).to(resolve_device(device)).eval()
    return load_model(folder).to(resolve_device(device)).eval()


# -- recordings on disk ------------------------------------------------------------------------------------


@dataclass
class Embeddings:
    """Embeddings of recordings read from files, one row each, with where they came from."""

    ids: list[str]
    values: np.ndarray  # [recordings, features]
    meta: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def save(self, out: str | Path) -> list[Path]:
        """``embeddings.npz`` (ids, values) and ``embeddings.tsv`` (one row per recording: id, subject, session,
        run, condition, tr, source) into folder ``out``."""
        import pandas as pd

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        np.savez(out / "embeddings.npz", ids=np.asarray(self.ids), values=self.values)
        pd.DataFrame(self.meta).to_csv(out / "embeddings.tsv", sep="\t", index=False)
        return [out / "embeddings.npz", out / "embeddings.tsv"]


# Parcel centres of the atlas given and the model's further apart than this (mean, mm) are another atlas or order.
ATLAS_TOLERANCE_MM = 5.0


def _check_same_atlas(given_R3: np.ndarray, trained_R3: np.ndarray) -> None:
    """Refuse an atlas with the model's parcel count whose parcels are not the model's, in the model's order."""
    if given_R3.shape != trained_R3.shape or not np.isfinite(given_R3).all():
        return  # counts are checked by the caller; an atlas without centres cannot be compared
    gap = np.linalg.norm(given_R3 - trained_R3, axis=1)
    if gap.mean() > ATLAS_TOLERANCE_MM:
        worst = int(np.argmax(gap))
        raise InputError(
            f"the atlas given has the model's {len(gap)} parcels, but their centres lie {gap.mean():.1f} mm from the "
            f"model's on average (parcel {worst}: {gap[worst]:.1f} mm); expected the model's atlas in its order "
            "(extra.json's atlas): parcellate with that atlas, or reorder its labels to match"
        )


def embed_files(
    model: BrainLM,
    inputs: str | Path | list[str | Path],
    atlas: str | Path | None = None,
    atlas_table: str | Path | None = None,
    kind: str = "auto",
    pooling: str = "cls",
    resample: bool = False,
    stride: int | None = None,
    progress: bool = True,
    scaling: str = "model",
) -> Embeddings:
    """Embed recordings straight from files, no shard build: a BIDS/fMRIPrep folder or plain 4D NIfTI files
    (parcellated with ``atlas``, the label image or 4D maps of the model's atlas, through nilearn's masker), or
    parcel arrays (.npy/.mat/.tsv/.csv). Each recording's TR (sidecar, recordings.tsv, NIfTI header) is checked
    against the model's; ``resample``, ``stride`` and ``scaling`` are `Preprocessing`'s. A recording that cannot be
    used is skipped with its reason, as in a build."""
    from brainlm import progress as progress_bars
    from brainlm.recordings.atlas import AtlasSource, load_atlas
    from brainlm.recordings.parcellate import load_array, parcellate_nifti
    from brainlm.recordings.sources import discover, spec_for_file

    specs = _specs(inputs, kind, atlas, discover, spec_for_file)
    trained = (model.extra or {}).get("atlas")
    source: AtlasSource | None = load_atlas(atlas, atlas_table) if (atlas or atlas_table) else None
    R = len(trained["labels"]) if trained else (source.atlas.num_parcels if source else None)
    if R is None:
        raise InputError(
            "the model has no atlas (extra.json): pass atlas_table= (name, x, y, z) or atlas= a label image"
        )
    if source is not None and source.atlas.num_parcels != R:
        raise InputError(
            f"the atlas given has {source.atlas.num_parcels} parcels but the model was trained on {R}; parcellate with "
            "the model's atlas"
        )
    if source is not None and trained and trained.get("coords_mm"):
        _check_same_atlas(np.asarray(source.atlas.coords_mm, float), np.asarray(trained["coords_mm"], float))
    check_pooling(pooling)
    pre = Preprocessing(
        resample=resample, stride=stride, scaling=scaling, coords=None if trained else source.atlas.coords()
    )
    ids, rows, meta, skipped = [], [], [], []
    for spec in progress_bars.bar(specs, desc="embed", unit="rec", enabled=progress):
        try:
            if spec.kind == "nifti":
                if source is None or source.image is None:
                    raise InputError(f"{spec.path}: a NIfTI input needs atlas= (the model's label image or maps)")
                signal_RT, header_tr, _ = parcellate_nifti(spec, source)
                tr = spec.tr or header_tr
            else:
                signal_RT, tr = load_array(spec.path), spec.tr
            rows.append(model.embed(signal_RT, pooling=pooling, preprocessing=dataclasses.replace(pre, tr=tr)))
        except InputError as err:
            skipped.append({"recording": spec.id, "source": spec.path, "reason": str(err)})
            continue
        ids.append(spec.id)
        meta.append({k: v for k, v in dataclasses.asdict(spec).items() if k in META} | {"tr": tr, "source": spec.path})
    if not rows:
        reasons = "; ".join(f"{s['recording']}: {s['reason']}" for s in skipped[:3])
        raise InputError(f"no recording could be embedded ({len(skipped)} skipped): {reasons}")
    return Embeddings(ids, np.stack(rows), meta, skipped)


META = ("id", "subject", "session", "run", "condition")


def _specs(inputs, kind, atlas, discover, spec_for_file) -> list:
    paths = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    specs = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            specs += discover(p, kind, str(atlas) if atlas else None)[0]
        elif p.is_file():
            specs.append(spec_for_file(p))
        else:
            raise InputError(f"--inputs {p}: no such file or folder")
    if not specs:
        raise InputError(f"--inputs {inputs}: found no recordings")
    return specs


# -- scikit-learn ------------------------------------------------------------------------------------------


class BrainLMEmbedder(TransformerMixin, BaseEstimator):
    """A scikit-learn transformer: recordings in (a list of arrays, or one 3-D array), one embedding per recording
    out. ``fit`` learns nothing (the model is pretrained): it loads the model into ``model_`` so the embedder sits in
    a ``Pipeline`` in front of any estimator, and the constructor's parameters stay as given (scikit-learn's
    estimator contract, as nilearn's maskers keep it: ``clone`` and cross-validation work). ``pooling``: cls | mean |
    latent_fc (the parcel x parcel connectivity of the encoder tokens, which carries the coupling a pooled vector
    averages away)."""

    def __init__(
        self,
        model: BrainLM | str | Path,
        pooling: str = "cls",
        tr: float | None = None,
        layout: str = "auto",
        resample: bool = False,
        stride: int | None = None,
    ) -> None:
        self.model, self.pooling, self.tr, self.layout, self.resample, self.stride = (
            model,
            pooling,
            tr,
            layout,
            resample,
            stride,
        )

    def _model(self) -> BrainLM:
        """The loaded model: ``model_`` once fitted (the constructor's ``model`` is kept as given, the estimator
        contract scikit-learn's ``clone`` relies on), else loaded now."""
        if getattr(self, "model_", None) is None:
            self.model_ = load(self.model) if isinstance(self.model, (str, Path)) else self.model
        return self.model_

    def fit(self, X: Any, y: Any = None) -> BrainLMEmbedder:
        check_pooling(self.pooling)
        self.model_ = None
        self._model()
        return self

    def transform(self, X: Any) -> np.ndarray:
        recordings = list(X) if not isinstance(X, np.ndarray) or X.ndim == 3 else [X]
        pre = Preprocessing(tr=self.tr, layout=self.layout, resample=self.resample, stride=self.stride)
        return np.stack([self._model().embed(r, pooling=self.pooling, preprocessing=pre) for r in recordings])
