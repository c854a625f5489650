"""Find the recordings of an input folder: BIDS/fMRIPrep derivatives, plain 4D NIfTI, or parcel arrays."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from brainlm.exceptions import InputError

NIFTI = (".nii", ".nii.gz")
ARRAYS = (".npy", ".mat", ".tsv", ".csv")
# Files that describe a folder rather than hold a recording.
RESERVED = {"participants.tsv", "recordings.tsv", "atlas.tsv", "atlas.csv"}
ENTITY = re.compile(r"(?:^|_)(sub|ses|task|acq|run)-([a-zA-Z0-9]+)")


@dataclass
class RecordingSpec:
    """One input recording, before it is read."""

    id: str
    path: str
    subject: str
    condition: str
    kind: str  # nifti | array
    session: str | None = None
    run: str | None = None
    tr: float | None = None  # from recordings.tsv or a BIDS sidecar; else read from the NIfTI header
    confounds: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _suffix(path: Path) -> str:
    return ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix.lower()


def strip_sub(subject: str) -> str:
    subject = str(subject).strip()
    return subject[4:] if subject.startswith("sub-") else subject


def parse_entities(name: str) -> dict[str, str]:
    return {k: v for k, v in ENTITY.findall(name)}


def _recording_id(ents: dict[str, str], fallback: str) -> str:
    if "sub" not in ents:
        return re.sub(r"[^A-Za-z0-9_-]", "-", fallback)
    parts = [f"{k}-{ents[k]}" for k in ("sub", "ses", "task", "acq", "run") if k in ents]
    return "_".join(parts)


def read_participants(root: Path) -> dict[str, dict]:
    """Phenotypes per subject from ``participants.tsv`` (BIDS): ``participant_id`` + any columns."""
    path = root / "participants.tsv"
    if not path.exists():
        return {}
    table = pd.read_csv(path, sep="\t", na_values=["n/a", "NA", ""], dtype={"participant_id": str})
    if "participant_id" not in table:
        raise InputError(f"{path}: expected a 'participant_id' column, got {list(table.columns)}")
    out = {}
    for row in table.to_dict(orient="records"):
        sub = strip_sub(row.pop("participant_id"))
        out[sub] = {k: (None if pd.isna(v) else (v.item() if hasattr(v, "item") else v)) for k, v in row.items()}
    return out


def _bids_tr(path: Path) -> float | None:
    sidecar = Path(str(path).replace(".nii.gz", ".json").replace(".nii", ".json"))
    if sidecar.exists():
        try:
            tr = json.loads(sidecar.read_text()).get("RepetitionTime")
        except json.JSONDecodeError as err:
            raise InputError(f"{sidecar} is not valid JSON: {err}") from err
        return float(tr) if tr is not None else None
    return None


def _confounds_of(path: Path) -> str | None:
    name = path.name
    stem = name[: name.index("_space-")] if "_space-" in name else name.split("_desc-")[0]
    candidate = path.parent / f"{stem}_desc-confounds_timeseries.tsv"
    return str(candidate) if candidate.exists() else None


def discover(src: str | Path, kind: str = "auto", atlas_image: str | None = None) -> tuple[list[RecordingSpec], str]:
    """The recordings under ``src`` and the source kind that was detected (bids | nifti | arrays)."""
    root = Path(src).resolve()
    if not root.is_dir():
        raise InputError(f"--inputs {src}: expected a folder of recordings, found no such folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    atlas_resolved = Path(atlas_image).resolve() if atlas_image else None
    if kind == "auto":
        if any(p.name.endswith(("_desc-preproc_bold.nii.gz", "_desc-preproc_bold.nii")) for p in files):
            kind = "bids"
        elif any(_suffix(p) in NIFTI and p.resolve() != atlas_resolved and "atlas" not in p.name for p in files):
            kind = "nifti"
        elif (root / "recordings.tsv").exists() or any(_suffix(p) in ARRAYS and p.name not in RESERVED for p in files):
            kind = "arrays"
        else:
            raise InputError(
                f"--inputs {src}: found no recordings; expected *_desc-preproc_bold.nii.gz (BIDS/fMRIPrep), "
                f"4D .nii/.nii.gz files, or parcel arrays ({', '.join(ARRAYS)})"
            )
    if kind == "bids":
        specs = [
            _spec_from_name(p, "nifti", tr=_bids_tr(p), confounds=_confounds_of(p))
            for p in files
            if p.name.endswith(("_desc-preproc_bold.nii.gz", "_desc-preproc_bold.nii"))
        ]
    elif kind == "nifti":
        specs = [
            _spec_from_name(p, "nifti", tr=_bids_tr(p))
            for p in files
            if _suffix(p) in NIFTI and p.resolve() != atlas_resolved and "atlas" not in p.name
        ]
    elif kind == "arrays":
        specs = _array_specs(root, files)
    else:
        raise InputError(f"--kind {kind!r}: expected auto, bids, nifti or arrays")
    ids = [s.id for s in specs]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise InputError(f"--inputs {src}: recording ids {dupes[:5]} occur more than once; make file names unique")
    return specs, kind


def spec_for_file(path: str | Path) -> RecordingSpec:
    """One recording given as a file: a 4D NIfTI or a parcel array, with its BIDS entities and sidecar TR."""
    path = Path(path)
    suffix = _suffix(path)
    if suffix not in (*NIFTI, *ARRAYS):
        raise InputError(f"{path}: expected a 4D NIfTI ({', '.join(NIFTI)}) or a parcel array ({', '.join(ARRAYS)})")
    return _spec_from_name(path.resolve(), "nifti" if suffix in NIFTI else "array", tr=_bids_tr(path))


def _spec_from_name(path: Path, kind: str, tr: float | None = None, confounds: str | None = None) -> RecordingSpec:
    ents = parse_entities(path.name)
    stem = path.name.split(".")[0]
    return RecordingSpec(
        id=_recording_id(ents, stem),
        path=str(path),
        subject=ents.get("sub", stem),
        condition=ents.get("task", "unknown"),
        kind=kind,
        session=ents.get("ses"),
        run=ents.get("run"),
        tr=tr,
        confounds=confounds,
    )


def _array_specs(root: Path, files: list[Path]) -> list[RecordingSpec]:
    table_path = root / "recordings.tsv"
    if not table_path.exists():
        return [_spec_from_name(p, "array") for p in files if _suffix(p) in ARRAYS and p.name not in RESERVED]
    table = pd.read_csv(table_path, sep="\t", dtype=str, na_values=["n/a", ""], keep_default_na=False)
    table.columns = [c.strip().lower() for c in table.columns]
    if "file" not in table or "subject" not in table:
        raise InputError(
            f"{table_path}: expected columns file, subject[, condition, tr, session, run, recording], "
            f"got {list(table.columns)}"
        )
    specs = []
    for row in table.to_dict(orient="records"):
        path = root / row["file"]
        ents = parse_entities(path.name)
        tr = row.get("tr")
        specs.append(
            RecordingSpec(
                id=row.get("recording") or _recording_id(ents, path.name.split(".")[0]),
                path=str(path),
                subject=strip_sub(row["subject"]),
                condition=row.get("condition") or row.get("task") or ents.get("task", "unknown"),
                kind="array",
                session=row.get("session") or ents.get("ses"),
                run=row.get("run") or ents.get("run"),
                tr=float(tr) if tr not in (None, "") and not pd.isna(tr) else None,
            )
        )
    return specs
