"""Turn one recording into a ``[R parcels, T timepoints]`` float32 array, whatever its format."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainlm.exceptions import AtlasMismatchError, DimensionError, EmptyRecordingError, InputError
from brainlm.recordings.atlas import AtlasSource
from brainlm.recordings.sources import RecordingSpec


def load_array(path: str | Path) -> np.ndarray:
    """A 2-D array from ``.npy``, ``.mat`` (one 2-D variable) or ``.tsv``/``.csv`` (optional header row)."""
    path = Path(path)
    name = path.name.lower()
    try:
        if name.endswith(".npy"):
            arr = np.load(path, allow_pickle=False)
        elif name.endswith(".mat"):
            from scipy.io import loadmat

            variables = {k: v for k, v in loadmat(path).items() if not k.startswith("__")}
            two_d = {k: v for k, v in variables.items() if isinstance(v, np.ndarray) and v.ndim == 2}
            if len(two_d) != 1:
                raise InputError(
                    f"{path}: expected exactly one 2-D variable in the .mat file, found "
                    f"{ {k: getattr(v, 'shape', type(v).__name__) for k, v in variables.items()} }"
                )
            arr = next(iter(two_d.values()))
        elif name.endswith((".tsv", ".csv")):
            import pandas as pd

            sep = "\t" if name.endswith(".tsv") else ","
            frame = pd.read_csv(path, sep=sep, header=None)
            # A header row is any first row that is not numeric.
            first = pd.to_numeric(frame.iloc[0], errors="coerce")
            if first.isna().any():
                frame = frame.iloc[1:]
            arr = frame.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
        else:
            raise InputError(f"{path}: unsupported array format; expected .npy, .mat, .tsv or .csv")
    except InputError:
        raise
    except Exception as err:
        raise InputError(f"{path}: unreadable ({type(err).__name__}: {err})") from err
    if arr.ndim != 2:
        raise DimensionError(f"{path}: expected a 2-D array (parcels x timepoints), got shape {arr.shape}")
    return np.asarray(arr, dtype=np.float32)


def orient(arr: np.ndarray, num_parcels: int, path: str) -> tuple[np.ndarray, str]:
    """Return ``[R, T]`` and the orientation found in the file: ``RT`` or ``TR`` (transposed)."""
    rows, cols = arr.shape
    if rows == num_parcels and cols == num_parcels:
        raise DimensionError(
            f"{path}: shape {arr.shape} is ambiguous: both axes equal the atlas's {num_parcels} parcels, so "
            "parcels and timepoints cannot be told apart; crop or pad the recording so T differs from R"
        )
    if rows == num_parcels:
        return arr, "RT"
    if cols == num_parcels:
        return np.ascontiguousarray(arr.T), "TR"
    raise DimensionError(
        f"{path}: shape {arr.shape} has no axis of length {num_parcels}, the atlas's parcel count; "
        "check that the array was parcellated with the same atlas as --atlas-table"
    )


def check_geometry(img, atlas_img, path: str, atlas_path: str) -> None:
    """Refuse an image whose grid differs from the atlas's (nilearn would silently resample)."""
    if img.shape[:3] != atlas_img.shape[:3] or not np.allclose(img.affine, atlas_img.affine, atol=1e-3):

        def grid(im) -> str:  # shape, voxel sizes and origin: what differs between two grids
            zooms = np.sqrt((im.affine[:3, :3] ** 2).sum(axis=0)).round(3).tolist()
            return f"shape {tuple(im.shape[:3])}, voxels {zooms} mm, origin {im.affine[:3, 3].round(3).tolist()}"

        raise AtlasMismatchError(
            f"{path}: image grid ({grid(img)}) does not match the atlas {atlas_path} grid ({grid(atlas_img)}); "
            "resample one to the other, or pass --resample-atlas to let nilearn resample the atlas to each image"
        )


DENOISE = ("none", "simple", "scrubbing", "compcor")


@dataclass
class Cleaning:
    """How a recording is cleaned while it is parcellated (nilearn's masker / signal.clean)."""

    denoise: str = "none"  # an fMRIPrep strategy (nilearn load_confounds_strategy), or none
    confounds: list[str] | None = None  # explicit confound columns (fMRIPrep's table, or one beside an array)
    high_pass: float | None = None  # Hz
    resample_atlas: bool = False

    def __post_init__(self) -> None:
        if self.denoise not in DENOISE:
            raise InputError(f"--denoise {self.denoise!r}: expected one of {', '.join(DENOISE)}")
        if self.denoise != "none" and self.confounds:
            raise InputError("--denoise and --confounds both choose the confounds: give one")


def confound_table(path: str, columns: list[str]) -> np.ndarray:
    """Explicit confound columns; a missing value (fMRIPrep's derivatives start with n/a) takes the column mean."""
    import pandas as pd

    table = pd.read_csv(path, sep="\t", na_values=["n/a", "NA", ""])
    missing = [c for c in columns if c not in table]
    if missing:
        raise InputError(f"{path}: no confound column(s) {missing}; columns: {', '.join(table.columns[:20])}")
    chosen = table[columns].astype(float)
    return chosen.fillna(chosen.mean()).fillna(0.0).to_numpy()


def _strategy(spec: RecordingSpec, denoise: str):
    """(confounds, sample_mask) of an fMRIPrep recording for a named strategy."""
    from nilearn.interfaces.fmriprep import load_confounds_strategy

    try:
        confounds, sample_mask = load_confounds_strategy(spec.path, denoise_strategy=denoise)
    except Exception as err:  # nilearn says which file or column it could not find
        raise InputError(
            f"{spec.path}: --denoise {denoise} needs fMRIPrep's confounds beside the image "
            f"(*_desc-confounds_timeseries.tsv and .json): {type(err).__name__}: {err}"
        ) from None
    return confounds, sample_mask


def parcellate_nifti(
    spec: RecordingSpec,
    atlas: AtlasSource,
    cleaning: Cleaning | None = None,
) -> tuple[np.ndarray, float | None, dict]:
    """Mean signal per parcel of a 4D NIfTI (nilearn NiftiLabelsMasker / NiftiMapsMasker), cleaned as ``cleaning``
    says: (signal [R, T], the header TR, what was done: frames scrubbed, confounds used)."""
    import nibabel as nib
    from nilearn.maskers import NiftiLabelsMasker, NiftiMapsMasker

    cleaning = cleaning or Cleaning()
    if atlas.image is None:
        raise InputError(f"{spec.path}: a NIfTI input needs an atlas image; pass --atlas LABELS.nii.gz")
    try:
        img = nib.load(spec.path)
        shape = img.shape
    except Exception as err:
        raise InputError(f"{spec.path}: unreadable NIfTI ({type(err).__name__}: {err})") from err
    if len(shape) != 4:
        raise DimensionError(f"{spec.path}: expected a 4D image (x, y, z, time), got shape {shape}")
    img = load_checked(img, spec.path)
    atlas_img = nib.load(atlas.image)
    if not cleaning.resample_atlas:
        check_geometry(img, atlas_img, spec.path, atlas.image)
    header_tr = float(img.header.get_zooms()[3]) if len(img.header.get_zooms()) > 3 else None
    tr = spec.tr or header_tr
    confounds, sample_mask, done = None, None, {}
    if cleaning.denoise != "none":
        confounds, sample_mask = _strategy(spec, cleaning.denoise)
        done["denoise"] = cleaning.denoise
        if sample_mask is not None:
            done["frames_scrubbed"] = int(shape[3] - len(sample_mask))
            if len(sample_mask) < 2:
                raise EmptyRecordingError(
                    f"{spec.path}: {len(sample_mask)} timepoints left after {done['frames_scrubbed']} high-motion "
                    f"frames were scrubbed (--denoise {cleaning.denoise}); drop the recording or use another strategy"
                )
    elif cleaning.confounds:
        if not spec.confounds:
            raise InputError(f"{spec.path}: --confounds given but no *_desc-confounds_timeseries.tsv beside it")
        confounds = confound_table(spec.confounds, cleaning.confounds)
        done["confound_columns"] = cleaning.confounds
    kwargs = dict(
        standardize=None,
        detrend=False,
        resampling_target="data" if cleaning.resample_atlas else None,
        t_r=tr,
        high_pass=cleaning.high_pass,
    )
    if atlas.kind == "maps":
        masker = NiftiMapsMasker(maps_img=atlas_img, **kwargs)
    else:
        masker = NiftiLabelsMasker(labels_img=atlas_img, **kwargs)
    try:
        signal_TR = masker.fit_transform(img, confounds=confounds, sample_mask=sample_mask)
    except Exception as err:
        raise InputError(f"{spec.path}: parcellation failed ({type(err).__name__}: {err})") from err
    if atlas.kind == "labels":
        # The masker returns one column per label present in the atlas, in ascending label order.
        ids = masker.region_ids_  # {"background": 0, column: label value, ...}
        present = [int(ids[i]) for i in sorted(k for k in ids if k != "background")]
        missing = sorted(set(atlas.label_values or []) - set(present))
        if missing:
            raise AtlasMismatchError(f"{spec.path}: atlas labels {missing[:10]} do not overlap the image")
        order = [present.index(v) for v in atlas.label_values or present]
        signal_TR = signal_TR[:, order]
    if signal_TR.shape[1] != atlas.atlas.num_parcels:
        raise AtlasMismatchError(
            f"{spec.path}: parcellation gave {signal_TR.shape[1]} parcels but the atlas has "
            f"{atlas.atlas.num_parcels}; some parcels do not overlap the image"
        )
    return np.ascontiguousarray(signal_TR.T, dtype=np.float32), header_tr, done


def clean_array(signal_RT: np.ndarray, spec: RecordingSpec, cleaning: Cleaning, tr: float | None) -> np.ndarray:
    """Confound regression (and high-pass) of a parcel array, as nilearn's masker does it for an image."""
    if cleaning.denoise != "none":
        raise InputError(
            f"{spec.path}: --denoise reads fMRIPrep's confounds of an image; for parcel arrays name the columns with "
            "--confounds (a *_desc-confounds_timeseries.tsv beside the array)"
        )
    if not cleaning.confounds and cleaning.high_pass is None:
        return signal_RT
    from nilearn.signal import clean

    confounds = None
    if cleaning.confounds:
        if not spec.confounds:
            raise InputError(f"{spec.path}: --confounds given but no *_desc-confounds_timeseries.tsv beside it")
        confounds = confound_table(spec.confounds, cleaning.confounds)
        if len(confounds) != signal_RT.shape[1]:
            raise DimensionError(
                f"{spec.confounds}: {len(confounds)} rows of confounds for {signal_RT.shape[1]} timepoints of "
                f"{spec.path}"
            )
    if cleaning.high_pass is not None and tr is None:
        raise InputError(f"{spec.path}: --high-pass needs the TR (recordings.tsv column tr, or --tr)")
    cleaned = clean(
        signal_RT.T, confounds=confounds, detrend=False, standardize=False, high_pass=cleaning.high_pass, t_r=tr
    )
    return np.ascontiguousarray(cleaned.T, dtype=np.float32)


def load_checked(img, path: str):
    """The image's data read once (a compressed file read volume by volume costs a re-read per volume), refused
    if non-finite values are present (nilearn would set them to 0 before averaging), and handed back in memory so
    the masker does not decompress it again."""
    data = np.asanyarray(img.dataobj)
    if np.issubdtype(data.dtype, np.floating):
        bad = [(t, int(n)) for t in range(data.shape[3]) if (n := data[..., t].size - np.isfinite(data[..., t]).sum())]
        if bad:
            shown = ", ".join(f"{t} ({n} voxels)" for t, n in bad[:8])
            raise InputError(
                f"{path}: {len(bad)} volume(s) hold non-finite values (NaN or inf): volume {shown}"
                f"{' ...' if len(bad) > 8 else ''}; fix or drop them before parcellating (the masker would read them "
                "as 0)"
            )
    return img.__class__(data, img.affine, img.header)


def resample_time(signal_RT: np.ndarray, tr: float, target_tr: float) -> np.ndarray:
    """Resample to ``target_tr`` with an anti-aliased polyphase filter (scipy.signal.resample_poly)."""
    from brainlm.model.inference import resample_to

    return resample_to(signal_RT, tr, target_tr).astype(np.float32)
