"""Inference on a lab's own recordings, with the preprocessing the model was trained with applied for them.

    model = brainlm.load("models:/brainlm-debug@current")
    emb_BD = model.embed(signal_TR, tr=0.72)                  # one recording [time, parcels] (nilearn's layout)
    out = model.reconstruct(signal_TR, tr=0.72, mask_ratio=0.5)

What happens to a recording (``prepare``): its layout is read ([time, parcels] or [parcels, time], from the parcel
count when ``layout="auto"``), its parcel count and TR are checked against the model's (a mismatch is an error that
names both; ``resample=True`` resamples in time with an anti-aliasing polyphase filter; a TR-aware model,
``model.time_unit_s``, takes each TR it was trained at and is told the windows' TR), it is scaled exactly as the
training data were (the model's ``scaling.json``: per-recording normalisation, then ``(x - median) / IQR`` per
parcel with the training statistics) and cut into windows of the model's length (``stride``: default the window,
non-overlapping). Coordinates come from the model's atlas unless given. Everything runs in eval mode on the
model's device (bf16 autocast on a GPU), deterministically.

Shapes: B recordings, R parcels, T timepoints, W windows per recording, D width. About 460 lines in one file on
purpose: every path from a user's recording to the model (prepare, window features, embed, reconstruct) in one place.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from brainlm.exceptions import DimensionError, InputError, TRMismatchError
from brainlm.model.prior import same_atlas
from brainlm.model.scaling import RobustScaler, non_finite
from brainlm.scores import r2_score

# The model these functions run: a BrainLM (brainlm/model/mae.py), which imports this module for its `embed` and
# `reconstruct` methods (RecordingMethods below), so this module names it without importing it.
BrainLM = torch.nn.Module

POOLINGS = ("cls", "mean", "latent_fc")
LAYOUTS = ("auto", "TR", "RT")
TR_TOLERANCE = 1e-3  # seconds


def _as_list(recording: Any) -> tuple[list[np.ndarray], bool]:
    """One recording (2-D), a batch (3-D, same length) or a list of 2-D recordings -> (arrays, was_single)."""
    if isinstance(recording, (list, tuple)):
        arrays = [
            np.asarray(r.detach().cpu() if isinstance(r, torch.Tensor) else r, dtype=np.float64) for r in recording
        ]
        single = False
    else:
        a = recording.detach().cpu().numpy() if isinstance(recording, torch.Tensor) else np.asarray(recording)
        a = a.astype(np.float64)
        if a.ndim == 2:
            arrays, single = [a], True
        elif a.ndim == 3:
            arrays, single = list(a), False
        else:
            raise DimensionError(
                f"a recording is a 2-D array [time, parcels] (or [parcels, time]); a batch is 3-D or a list; got "
                f"shape {a.shape}"
            )
    for i, a in enumerate(arrays):
        if a.ndim != 2:
            raise DimensionError(f"recording {i}: expected a 2-D array, got shape {a.shape}")
    return arrays, single


def _orient(a: np.ndarray, R: int, layout: str, index: int) -> np.ndarray:
    """[parcels, time] from either layout."""
    if layout == "auto":
        if a.shape[0] == R and a.shape[1] == R:
            raise DimensionError(
                f"recording {index}: shape {a.shape} has {R} on both axes, so time and parcels cannot be told apart: "
                "pass layout='TR' ([time, parcels]) or layout='RT'"
            )
        layout = "TR" if a.shape[1] == R else "RT" if a.shape[0] == R else "?"
    rt = a.T if layout == "TR" else a
    if rt.shape[0] != R:
        raise DimensionError(
            f"recording {index}: shape {a.shape} has no axis of {R} parcels, the model's atlas; parcellate it with "
            "the atlas the model was trained on (its extra.json names it) or pass the matching coordinates"
        )
    bad, rows = non_finite(rt)
    if len(rows):
        raise InputError(
            f"recording {index}: {int(bad.sum())} non-finite value(s) (NaN or inf) in {len(rows)} parcel(s), e.g. "
            f"parcel {rows[0]} at timepoint {int(np.flatnonzero(bad[rows[0]])[0])}; the model needs finite values "
            "everywhere: fix or drop those timepoints (or the parcel) before embedding or reconstructing"
        )
    return rt


def resample_to(signal_RT: np.ndarray, tr: float, target_tr: float) -> np.ndarray:
    """Resample in time from ``tr`` to ``target_tr`` with scipy's anti-aliased polyphase filter."""
    from scipy.signal import resample_poly

    ratio = Fraction(tr / target_tr).limit_denominator(1000)  # new samples per old sample = up / down
    return resample_poly(signal_RT, ratio.numerator, ratio.denominator, axis=1)


SCALINGS = ("model", "fit", "none")


@dataclass(frozen=True, eq=False)
class Preprocessing:
    """How recordings become the model's windows: one value for `prepare`, `embed` and `reconstruct`, which also take
    its fields as keywords (``tr=0.72``); the scikit-learn embedder, `brainlm.api.embed_files` and the pyfunc build one
    from the options they expose.

    tr: the recordings' TR in seconds (None: taken to be the model's, unchecked, with a warning).
    layout: ``auto`` (from the parcel count), ``TR`` ([time, parcels], nilearn's) or ``RT``.
    stride: the step between windows (None: the window, non-overlapping).
    coords: parcel centres [R, 3] in MNI mm (None: the model's atlas).
    resample: resample another TR to the model's (anti-aliased polyphase filter; a TR-aware model's nearest); else
        another TR is an error (a TR-aware model, ``model.time_unit_s``, takes each TR it was trained at as it is).
    scaling: ``model`` (the training statistics saved with the model; fitted on the recordings given, with a
        warning, for a model without them, as an imported release), ``fit`` (on the recordings given) or ``none``
        (already scaled)."""

    tr: float | None = None
    layout: str = "auto"
    stride: int | None = None
    coords: Any = None
    resample: bool = False
    scaling: str = "model"

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise InputError(f"layout must be one of {', '.join(LAYOUTS)}; got {self.layout!r}")
        if self.scaling not in SCALINGS:
            raise InputError(f"scaling must be one of {', '.join(SCALINGS)}; got {self.scaling!r}")
        whole = isinstance(self.stride, (int, np.integer)) and not isinstance(self.stride, bool)
        if self.stride is not None and not (whole and self.stride >= 1):
            raise InputError(f"stride must be a whole number of timepoints, at least 1; got {self.stride!r}")
        number = isinstance(self.tr, (int, float, np.number)) and not isinstance(self.tr, bool)
        if self.tr is not None and not (number and self.tr > 0):
            raise InputError(f"tr must be a positive number of seconds; got {self.tr!r}")

    @classmethod
    def of(cls, preprocessing: Preprocessing | None = None, **options: Any) -> Preprocessing:
        """``preprocessing`` as given, or built from its fields given as keywords (not both)."""
        fields = tuple(cls.__dataclass_fields__)
        unknown = sorted(set(options) - set(fields))
        if unknown:  # a mistyped argument: a TypeError, as Python gives one, naming what is accepted here
            raise TypeError(
                f"unexpected keyword argument(s) {', '.join(unknown)}: besides the function's own arguments, the "
                f"preprocessing options are {', '.join(fields)}"
            )
        if preprocessing is None:
            return cls(**options)
        if not isinstance(preprocessing, cls):
            raise InputError(f"preprocessing: expected a Preprocessing, got {type(preprocessing).__name__}")
        if options:
            raise InputError(f"give preprocessing= or its options ({', '.join(sorted(options))}) as keywords, not both")
        return preprocessing


@dataclass
class Prepared:
    """Recordings ready for the model: scaled [R, T] arrays, their windows, and what was done to them."""

    signals_RT: list[np.ndarray]
    windows: list[np.ndarray]  # per recording [W, R, window]
    starts: list[list[int]]  # per recording, the first timepoint of each window
    coords_R3: torch.Tensor
    notes: list[str]
    tr: float | None = None  # the windows' TR (after any resampling); None: not known


def model_tr(model: BrainLM) -> float | None:
    tr = (model.extra or {}).get("tr")
    return float(tr) if tr is not None else None


def tr_aware(model: Any) -> bool:
    """Whether the model reads each window's TR (``model.time_unit_s`` > 0): then it was trained at several TRs."""
    return bool(getattr(model.config, "time_unit_s", 0))


def model_trs(model: BrainLM) -> list[float]:
    """The TRs a model was trained at: each of a TR-aware model's shard sets' (extra.json ``trained_on``), else its
    one TR (none for a model without a record of it)."""
    trs = [float(t["tr"]) for t in (model.extra or {}).get("trained_on", []) if t.get("tr")] if tr_aware(model) else []
    one = model_tr(model)
    trs = trs or ([one] if one is not None else [])
    return sorted({round(t, 6) for t in trs})


def untrained_tr(model: BrainLM, tr: float | None) -> str | None:
    """The TRs the model was trained at, as text ("0.72 s or 2 s"), when ``tr`` is none of them; None when it is one,
    or when either is not known."""
    trained = model_trs(model)
    if tr is None or not trained or min(abs(float(tr) - t) for t in trained) <= TR_TOLERANCE:
        return None
    return " or ".join(f"{t:g} s" for t in trained)


def tr_of(model: Any, tr: float | None) -> dict[str, float]:
    """``tr`` as the model's keyword where the model is TR-aware (and tr given), else nothing."""
    return {"tr": float(tr)} if tr is not None and tr_aware(model) else {}


def model_scaling(model: BrainLM, coords_R3: torch.Tensor) -> dict[str, Any]:
    """The saved scaling statistics of the atlas at ``coords_R3``: a model pretrained on a mixture of atlases keeps
    each atlas's (extra.json ``atlases``, from that atlas's first set); else the primary atlas's (scaling.json)."""
    for entry in (model.extra or {}).get("atlases", [])[1:]:
        if same_atlas(torch.tensor(entry["atlas"]["coords_mm"], dtype=torch.float32), coords_R3.float()):
            return entry["scaling"]
    return model.scaling


def model_coords(model: BrainLM, coords: Any = None) -> torch.Tensor:
    if coords is not None:
        return torch.as_tensor(np.asarray(coords, dtype=np.float32))
    atlas = (model.extra or {}).get("atlas")
    if not atlas:
        raise InputError(
            "the model folder has no atlas (extra.json): pass coords=[[x, y, z], ...] (MNI mm, one row per parcel), "
            "or import it with its atlas table (brainlm import-brainlm --atlas-table)"
        )
    return torch.tensor(atlas["coords_mm"], dtype=torch.float32)


def prepare(
    model: BrainLM, recording: Any, preprocessing: Preprocessing | None = None, **options: Any
) -> tuple[Prepared, bool]:
    """Orient, check, resample, scale and window recordings as the model was trained; (prepared, was_single).
    ``preprocessing`` (or its fields as keywords): `Preprocessing`."""
    pre = Preprocessing.of(preprocessing, **options)
    tr, layout, resample, scaling = pre.tr, pre.layout, pre.resample, pre.scaling
    coords_R3 = model_coords(model, pre.coords)
    R = coords_R3.shape[0]
    if model.parcel_embed is not None and model.config.num_parcels != R:
        raise DimensionError(
            f"the model has a learned table of {model.config.num_parcels} parcels; the coordinates give {R}"
        )
    arrays, single = _as_list(recording)
    signals = [_orient(a, R, layout, i) for i, a in enumerate(arrays)]
    notes: list[str] = []
    window_tr = tr
    if tr is None and model_trs(model):
        window_tr = model_tr(model)
        warnings.warn(
            f"no TR given: the recording is taken to be at the model's TR of {window_tr:g} s unchecked; pass tr= "
            "to have it checked, and resampled with resample=True",
            stacklevel=3,
        )
    said = untrained_tr(model, tr)
    if said:
        if not resample:
            raise TRMismatchError(
                f"the recording's TR is {tr:g} s but the model was trained at TR {said}; resample it "
                f"(resample=True in Python, --resample on the command line: an anti-aliased polyphase filter) or use a "
                f"model trained at {tr:g} s"
            )
        window_tr = min(model_trs(model), key=lambda t: abs(math.log(t / tr)))  # a TR-aware model's nearest
        signals = [resample_to(s, tr, window_tr) for s in signals]
        notes.append(f"resampled from TR {tr:g} s to {window_tr:g} s")
    if scaling == "model" and model.scaling is None:
        warnings.warn(
            "the model has no saved scaling statistics (an imported release): fitting the robust scaling on the "
            "recordings given; pass scaling='fit' to say so, or 'none' for data already scaled",
            stacklevel=3,
        )
        scaling = "fit"
    if scaling == "model":
        scaler = RobustScaler.from_dict(model_scaling(model, coords_R3))
        if scaler.center.shape[0] != R:
            raise DimensionError(
                f"the model's scaling statistics cover {scaler.center.shape[0]} parcels; the recordings have {R} "
                "(an atlas the model was not trained on): pass scaling='fit' to fit them on the "
                "recordings given"
            )
    elif scaling == "fit":
        scaler = RobustScaler.fit(signals)
        notes.append(f"robust scaling fitted on these {len(signals)} recording(s)")
    if scaling != "none":
        signals = [scaler.transform(s) for s in signals]
    W = model.config.num_timepoints
    step = pre.stride or W  # checked a whole number >= 1 by Preprocessing
    windows, starts = [], []
    for i, s in enumerate(signals):
        if s.shape[1] < W:
            raise DimensionError(
                f"recording {i} has {s.shape[1]} timepoints (after resampling), fewer than the model's window of {W}"
            )
        begin = list(range(0, s.shape[1] - W + 1, step))
        starts.append(begin)
        windows.append(np.stack([s[:, b : b + W] for b in begin]).astype(np.float32))
    prepared = Prepared([s.astype(np.float32) for s in signals], windows, starts, coords_R3, notes, window_tr)
    return prepared, single


def _device(model: BrainLM) -> torch.device:
    return next(model.parameters()).device


def autocast(device: torch.device):
    """bf16 autocast on a GPU; nothing on the CPU (fp32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise InputError(f"pooling must be one of {', '.join(POOLINGS)}; got {pooling!r}")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` checked (None: CUDA when a GPU is present, else the CPU)."""
    if device is None or device == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise InputError(f"device {device!r} is not a device torch knows; expected cpu, cuda or cuda:N") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(
            f"device {device!r} asked for, but this PyTorch sees no CUDA GPU (torch {torch.__version__}); "
            "use --device cpu (device='cpu'), or install a CUDA build of torch on a machine with a GPU"
        )
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise InputError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return resolved


@torch.no_grad()
def window_features(
    model: BrainLM,
    windows_NRW: np.ndarray,
    coords_R3: torch.Tensor,
    pooling: str = "cls",
    batch_size: int = 32,
    tr: float | None = None,
) -> np.ndarray:
    """Per window: the CLS embedding, the mean token, or the latent connectivity (``latent_fc``: the correlation
    between parcels of their encoder-token sequences, upper triangle, as correlations: ``fisher_z`` them after any
    averaging. A mean- or CLS-pooled embedding averages signed, zero-mean signals away, so it cannot carry the
    coupling between networks; this second-order pooling can)."""
    check_pooling(pooling)
    if pooling == "latent_fc" and not model.parcel_tokens:
        raise InputError(
            "pooling latent_fc correlates each parcel's own token sequence; the ViT-MAE's tokens are image patches "
            "over several parcels each, so it has none: use pooling cls or mean"
        )
    model.eval()
    device = _device(model)
    coords = coords_R3.to(device)
    R = windows_NRW.shape[1]
    iu = np.triu_indices(R, k=1)
    out = []
    for i in range(0, len(windows_NRW), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(windows_NRW[i : i + batch_size])).to(device)
        with autocast(device):
            cls_BD, tokens_BLD = model.encode(x, coords, **tr_of(model, tr))
        if pooling == "cls":
            out.append(cls_BD.float().cpu().numpy())
        elif pooling == "mean":
            out.append(tokens_BLD.float().mean(dim=1).cpu().numpy())
        else:
            t = tokens_BLD.reshape(len(x), R, -1).double()  # [B, R, N*D]
            t = t - t.mean(dim=2, keepdim=True)
            t = t / (t.norm(dim=2, keepdim=True) + 1e-12)
            corr = (t @ t.transpose(1, 2)).cpu().numpy()
            out.append(corr[:, iu[0], iu[1]])
    return np.concatenate(out)


def fisher_z(r: np.ndarray) -> np.ndarray:
    return np.arctanh(np.clip(r, -0.999999, 0.999999))


def embed(
    model: BrainLM,
    recording: Any,
    pooling: str = "cls",
    average: bool = True,
    batch_size: int = 32,
    preprocessing: Preprocessing | None = None,
    **options: Any,
) -> np.ndarray | list[np.ndarray]:
    """Embeddings of one recording ([D], or [W, D] with ``average=False``) or of a batch ([B, D], or a list of
    [W, D]); ``latent_fc`` gives R (R - 1) / 2 values instead of D. ``preprocessing``, or its fields as keywords
    (``tr=0.72, resample=True``): `Preprocessing`."""
    prep, single = prepare(model, recording, preprocessing, **options)
    per = [window_features(model, w, prep.coords_R3, pooling, batch_size, prep.tr) for w in prep.windows]
    z = fisher_z if pooling == "latent_fc" else (lambda v: v)  # correlations are averaged, then z-transformed
    if average:
        stacked = np.stack([z(p.mean(axis=0)) for p in per])
        return stacked[0] if single else stacked
    return z(per[0]) if single else [z(p) for p in per]


@dataclass
class Reconstruction:
    """Masked reconstruction of one recording's windows, in the model's scaled units."""

    signal_WRT: np.ndarray  # the scaled input windows
    prediction_WRT: np.ndarray  # the model's output (every value; compare on `mask_WRT`)
    mask_WRT: np.ndarray  # True where the model did not see the value
    starts: list[int]
    r2: float  # pooled over the masked values, unclipped


@torch.no_grad()
def reconstruct(
    model: BrainLM,
    recording: Any,
    mask_ratio: float | None = None,
    masking: str | None = None,
    mask: Any = None,
    seed: int = 0,
    context: int | str | None = "all",
    preprocessing: Preprocessing | None = None,
    **options: Any,
) -> Reconstruction | list[Reconstruction]:
    """Mask each window (seeded: ``seed``, ``mask_ratio``, ``masking``; or ``mask``, a token mask [L] or [W, L],
    parcel-major) and reconstruct it. A model whose prior reads recording context (``model.prior_context``) is given
    each window's ``context``: the other non-overlapping windows of the same recording ("all", or the K nearest; 0
    for none); any other model sees each window alone. ``preprocessing``, or its fields as keywords: `Preprocessing`."""
    from brainlm.model.context import context_statistics, context_windows

    prep, single = prepare(model, recording, preprocessing, **options)
    model.eval()
    device = _device(model)
    c = model.config
    R = prep.coords_R3.shape[0]
    ratio = c.mask_ratio if mask_ratio is None else mask_ratio
    out = []
    for windows, starts in zip(prep.windows, prep.starts, strict=True):
        W = len(windows)
        mask_BL = model.masks_from_seeds([seed * 100_003 + w for w in range(W)], R, ratio, masking or c.masking)
        if mask is not None:
            L = mask_BL.shape[1]
            m = torch.as_tensor(np.asarray(mask)).bool()
            if m.ndim == 1 or (m.ndim == 2 and m.shape[-1] == L):
                mask_BL = m.reshape(-1, L).expand(W, L)
            else:
                raise DimensionError(
                    f"mask must be [{L}] or [{W}, {L}] tokens (the model's: parcels x patches for BrainLM, image "
                    f"patches for a ViT-MAE); got {tuple(m.shape)}"
                )
        x = torch.from_numpy(windows).to(device)
        stats = None
        if c.prior_context and context not in (0, "0"):
            k = None if context in (None, "all") else int(context)
            cov_BRR, n_B = context_statistics(windows, context_windows([0] * W, list(starts), c.num_timepoints, k))
            stats = (torch.from_numpy(cov_BRR).to(device), torch.from_numpy(n_B).to(device))
        with autocast(device):
            coords = prep.coords_R3.to(device)
            res = model(x, coords, mask_BL=mask_BL.to(device), context=stats, **tr_of(model, prep.tr))
        pred = model.unpatchify(res.pred_BLP.float(), R).cpu().numpy()
        tmask = model.value_mask(mask_BL, R)
        out.append(Reconstruction(windows, pred, tmask, starts, r2_score(pred[tmask], windows[tmask])))
    return out[0] if single else out


class RecordingMethods:
    """A model's methods on a user's own recordings, preprocessed as it was trained (mixed into ``BrainLM``)."""

    def embed(self, recording: Any, **options: Any) -> Any:
        """Embeddings of your own recordings: `brainlm.model.inference.embed`."""
        return embed(self, recording, **options)

    def reconstruct(self, recording: Any, **options: Any) -> Any:
        """Masked reconstruction of your own recordings: `brainlm.model.inference.reconstruct`."""
        return reconstruct(self, recording, **options)
