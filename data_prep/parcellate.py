"""Turn one recording into a ``[R parcels, T timepoints]`` float32 array, whatever its format."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from brainlm.exceptions import AtlasMismatchError, DimensionError, InputError
from data_prep.atlas import AtlasSource
from data_prep.sources import RecordingSpec


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
        raise AtlasMismatchError(
            f"{path}: image grid {img.shape[:3]} (affine diagonal {np.diag(img.affine)[:3].round(3).tolist()}) "
            f"does not match the atlas {atlas_path} grid {atlas_img.shape[:3]} (affine diagonal "
            f"{np.diag(atlas_img.affine)[:3].round(3).tolist()}); resample one to the other, or pass "
            "--resample-atlas to let nilearn resample the atlas to each image"
        )


def parcellate_nifti(
    spec: RecordingSpec,
    atlas: AtlasSource,
    confound_columns: list[str] | None = None,
    resample_atlas: bool = False,
) -> tuple[np.ndarray, float | None]:
    """Mean signal per parcel of a 4D NIfTI (nilearn NiftiLabelsMasker / NiftiMapsMasker); and its header TR."""
    import nibabel as nib
    from nilearn.maskers import NiftiLabelsMasker, NiftiMapsMasker

    if atlas.image is None:
        raise InputError(f"{spec.path}: a NIfTI input needs an atlas image; pass --atlas LABELS.nii.gz")
    try:
        img = nib.load(spec.path)
        shape = img.shape
    except Exception as err:
        raise InputError(f"{spec.path}: unreadable NIfTI ({type(err).__name__}: {err})") from err
    if len(shape) != 4:
        raise DimensionError(f"{spec.path}: expected a 4D image (x, y, z, time), got shape {shape}")
    atlas_img = nib.load(atlas.image)
    if not resample_atlas:
        check_geometry(img, atlas_img, spec.path, atlas.image)
    header_tr = float(img.header.get_zooms()[3]) if len(img.header.get_zooms()) > 3 else None
    confounds = None
    if confound_columns:
        if not spec.confounds:
            raise InputError(f"{spec.path}: --confounds given but no *_desc-confounds_timeseries.tsv beside it")
        import pandas as pd

        table = pd.read_csv(spec.confounds, sep="\t")
        missing = [c for c in confound_columns if c not in table]
        if missing:
            raise InputError(f"{spec.confounds}: no confound column(s) {missing}")
        confounds = table[confound_columns].fillna(0.0).to_numpy()
    kwargs = dict(standardize=None, detrend=False, resampling_target="data" if resample_atlas else None)
    if atlas.kind == "maps":
        masker = NiftiMapsMasker(maps_img=atlas_img, **kwargs)
    else:
        masker = NiftiLabelsMasker(labels_img=atlas_img, **kwargs)
    try:
        signal_TR = masker.fit_transform(img, confounds=confounds)
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
    return np.ascontiguousarray(signal_TR.T, dtype=np.float32), header_tr


def resample_time(signal_RT: np.ndarray, tr: float, target_tr: float) -> np.ndarray:
    """Resample to ``target_tr`` with a cubic spline over time (same start, same duration)."""
    from scipy.interpolate import CubicSpline

    t = np.arange(signal_RT.shape[1]) * tr
    new_t = np.arange(0.0, t[-1] + 1e-9, target_tr)
    return CubicSpline(t, signal_RT, axis=1)(new_t).astype(np.float32)
