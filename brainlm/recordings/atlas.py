"""Atlases: a table (name, x, y, z[, network]) and/or a label image (3D labels or 4D probabilistic maps)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from brainlm.data.format import Atlas
from brainlm.exceptions import AtlasMismatchError, InputError
from brainlm.recordings.tables import read_tsv


@dataclass
class AtlasSource:
    """The atlas of a build: the parcel table, and the image to parcellate NIfTI inputs with (if any)."""

    atlas: Atlas
    image: str | None = None  # path to the label image or 4D maps
    kind: str = "labels"  # labels | maps
    label_values: list[int] | None = None  # label value of each parcel row (3D label images)
    sha256: str = ""


def read_table(path: str | Path, need_coords: bool = True) -> pd.DataFrame:
    """An atlas table: ``name, x, y, z[, network, index]`` (TSV or CSV), or a lookup table in nilearn's layout
    (``index, name[, network]``) when a label image gives the coordinates (``need_coords=False``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--atlas-table {path}: no such file; expected a TSV/CSV with name, x, y, z[, network]")
    sep = "," if path.suffix == ".csv" else "\t"
    table = read_tsv(path, "the atlas table", sep=sep)
    table.columns = [str(c).strip().lower() for c in table.columns]
    missing = [c for c in ("x", "y", "z") if c not in table.columns]
    if missing and need_coords:
        raise InputError(
            f"atlas table {path}: missing column(s) {missing}; expected a TSV/CSV with columns name, x, y, z (MNI mm) "
            f"and optionally network and index, got {list(table.columns)} (a lookup table without coordinates works "
            "with --atlas LABELS.nii.gz, whose parcels give them)"
        )
    if "index" in table and "background" in table.get("name", pd.Series(dtype=str)).astype(str).str.lower().values:
        table = table[table["name"].astype(str).str.lower() != "background"]  # nilearn's LUTs list label 0
    if not missing:
        for axis in ("x", "y", "z"):
            bad = pd.to_numeric(table[axis], errors="coerce").isna()
            if bad.any():
                row = int(bad.to_numpy().nonzero()[0][0])
                raise InputError(
                    f"atlas table {path}: column {axis} of row {row + 1} ({table.iloc[row].get('name', '')}) is "
                    f"{table[axis].iloc[row]!r}; expected MNI coordinates in mm as numbers"
                )
    return table


def atlas_from_table(path: str | Path, need_coords: bool = True) -> tuple[Atlas, list[int] | None]:
    """An atlas from its table; also returns the ``index`` column (label values) when present. Without x, y, z
    (``need_coords=False``) the coordinates are zeros, to be filled from the label image."""
    table = read_table(path, need_coords)
    names = [str(v) for v in table["name"]] if "name" in table else [f"parcel-{i}" for i in range(len(table))]
    networks = [str(v) for v in table["network"]] if "network" in table else None
    if {"x", "y", "z"} <= set(table.columns):
        coords = table[["x", "y", "z"]].to_numpy(dtype=float).round(3).tolist()
    else:
        coords = [[0.0, 0.0, 0.0] for _ in names]
    values = [int(v) for v in table["index"]] if "index" in table else None
    return Atlas(name=Path(path).stem, labels=names, coords_mm=coords, networks=networks), values


def _file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def load_atlas(image: str | Path | None, table: str | Path | None) -> AtlasSource:
    """Build the atlas of a build from a label image, a table, or both (table names + image geometry)."""
    if image is None and table is None:
        raise InputError("an atlas is needed: pass --atlas LABELS.nii.gz and/or --atlas-table TABLE.tsv")
    sha = hashlib.sha256()
    table_atlas, table_values = (
        atlas_from_table(table, need_coords=image is None) if table is not None else (None, None)
    )
    table_has_coords = table is not None and {"x", "y", "z"} <= set(read_table(table, need_coords=False).columns)
    if table is not None:
        sha.update(_file_sha256(table).encode())
    if image is None:
        return AtlasSource(atlas=table_atlas, sha256=sha.hexdigest())

    import nibabel as nib

    if not Path(str(image)).is_file():
        raise InputError(f"--atlas {image}: no such file; expected a 3D label image or 4D maps (.nii / .nii.gz)")
    sha.update(_file_sha256(image).encode())
    try:
        img = nib.load(str(image))
        data = np.asanyarray(img.dataobj)
    except Exception as err:
        raise InputError(f"cannot read the atlas image {image}: {err}") from err
    name = Path(str(image)).name.split(".")[0]
    if data.ndim == 4:  # probabilistic maps: one volume per parcel, coordinates at the weighted centre
        n = data.shape[3]
        ijk = np.indices(data.shape[:3]).reshape(3, -1)
        weights = np.clip(data.reshape(-1, n), 0, None)
        centres = (ijk @ weights) / np.maximum(weights.sum(axis=0), 1e-12)
        coords = nib.affines.apply_affine(img.affine, centres.T)
        kind, values = "maps", None
    elif data.ndim == 3:
        values = sorted(int(v) for v in np.unique(data) if v != 0)
        if table_values is not None:
            missing = sorted(set(table_values) - set(values))
            if missing:
                raise AtlasMismatchError(
                    f"atlas table {table} lists label values {missing[:10]} that do not occur in {image}"
                )
            values = table_values
        coords = []
        for v in values:
            ijk = np.argwhere(data == v).mean(axis=0)
            coords.append(nib.affines.apply_affine(img.affine, ijk))
        coords = np.asarray(coords)
        kind, n = "labels", len(values)
    else:
        raise AtlasMismatchError(f"atlas image {image} is {data.ndim}-D; expected 3-D labels or 4-D maps")

    if table_atlas is not None:
        if table_atlas.num_parcels != n:
            raise AtlasMismatchError(
                f"atlas table {table} has {table_atlas.num_parcels} rows but {image} has {n} parcels"
            )
        # The table's names, networks and coordinates win: they are what the user curated. A lookup table without
        # coordinates takes the image's (each parcel's centre of mass in MNI mm).
        if not table_has_coords:
            table_atlas.coords_mm = np.asarray(coords, dtype=float).round(3).tolist()
        return AtlasSource(atlas=table_atlas, image=str(image), kind=kind, label_values=values, sha256=sha.hexdigest())
    atlas = Atlas(
        name=name,
        labels=[f"parcel-{v}" for v in values] if values else [f"map-{i}" for i in range(n)],
        coords_mm=np.asarray(coords, dtype=float).round(3).tolist(),
    )
    return AtlasSource(atlas=atlas, image=str(image), kind=kind, label_values=values, sha256=sha.hexdigest())


def seitzman_atlas() -> Atlas:
    """The Seitzman et al. (2018) 300-ROI atlas with 14 network labels, from nilearn's package data."""
    from nilearn import datasets

    bunch = datasets.fetch_coords_seitzman_2018()
    coords = bunch.rois[["x", "y", "z"]].to_numpy(dtype=float)
    networks = [str(n) for n in bunch.networks]
    labels = [f"{net}-{i:03d}" for i, net in enumerate(networks)]
    return Atlas(name="seitzman2018_300", labels=labels, coords_mm=coords.round(3).tolist(), networks=networks)
