"""Find the recordings of an input folder: BIDS/fMRIPrep derivatives, plain 4D NIfTI, or parcel arrays.

BIDS file names are parsed by nilearn's BIDS interface (``parse_bids_filename``); every entity is kept with the
recording (space, res, dir, echo, ...). A derivatives folder with several output spaces needs ``--space``.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from brainlm.exceptions import InputError
from brainlm.recordings.tables import read_tsv, utf8_name

NIFTI = (".nii", ".nii.gz")
ARRAYS = (".npy", ".mat", ".tsv", ".csv")
# Files that describe a folder rather than hold a recording.
RESERVED = {"participants.tsv", "recordings.tsv", "atlas.tsv", "atlas.csv"}
ID_ENTITIES = ("sub", "ses", "task", "acq", "run")  # what a recording id is made of, in this order


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
    entities: dict[str, str] | None = None  # every BIDS entity of the file name (space, res, dir, echo, ...)

    def to_dict(self) -> dict:
        return asdict(self)


def _suffix(path: Path) -> str:
    return ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix.lower()


def strip_sub(subject: str) -> str:
    subject = str(subject).strip()
    return subject[4:] if subject.startswith("sub-") else subject


def parse_entities(name: str) -> dict[str, str]:
    """The BIDS entities of a file name (nilearn's parser): ``{"sub": "01", "task": "rest", "space": ...}``."""
    from nilearn.interfaces.bids import parse_bids_filename

    stem, dot, ext = name.partition(".")
    if "-" in stem.rsplit("_", 1)[-1]:  # no suffix (sub-01_task-rest_run-1.npy): BIDS names end in one
        name = f"{stem}_x{dot}{ext}"
    return {k: v for k, v in parse_bids_filename(name)["entities"].items() if v is not None}


def _recording_id(ents: dict[str, str], fallback: str, extra: tuple[str, ...] = ()) -> str:
    if "sub" not in ents:
        return re.sub(r"[^A-Za-z0-9_-]", "-", fallback)
    parts = [f"{k}-{ents[k]}" for k in (*ID_ENTITIES, *extra) if k in ents]
    return "_".join(parts)


def find_participants(inputs: Path) -> Path | None:
    """``participants.tsv`` of an input folder, or of the raw BIDS dataset a derivatives folder was made from: the
    one ``dataset_description.json`` names in ``SourceDatasets`` (a local URL or path), else the folder above a
    ``derivatives/`` folder."""
    candidates = [inputs / "participants.tsv"]
    desc = inputs / "dataset_description.json"
    if desc.is_file():
        try:
            sources = json.loads(desc.read_text()).get("SourceDatasets") or []
        except json.JSONDecodeError as err:
            raise InputError(f"{desc} is not valid JSON: {err}") from None
        for source in sources:
            url = str(source.get("URL", "")) if isinstance(source, dict) else str(source)
            url = url.removeprefix("file://").removeprefix("bids::")
            if url:
                candidates.append((inputs / url).resolve() / "participants.tsv")
    for parent in inputs.resolve().parents:
        if parent.name == "derivatives":
            candidates.append(parent.parent / "participants.tsv")
            break
    return next((c for c in candidates if c.is_file()), None)


def read_participants(path: Path | None) -> dict[str, dict]:
    """Phenotypes per subject from a BIDS ``participants.tsv``: ``participant_id`` + any columns. A subject listed
    twice with different values is an error (which row is right cannot be guessed)."""
    if path is None or not Path(path).exists():
        return {}
    path = Path(path)
    table = read_tsv(path, "participants table", na_values=["n/a", "NA", ""], dtype={"participant_id": str})
    if "participant_id" not in table:
        raise InputError(f"{path}: expected a 'participant_id' column, got {list(table.columns)}")
    out: dict[str, dict] = {}
    for row in table.to_dict(orient="records"):
        sub = strip_sub(row.pop("participant_id"))
        values = {k: (None if pd.isna(v) else (v.item() if hasattr(v, "item") else v)) for k, v in row.items()}
        if sub in out and out[sub] != values:
            changed = sorted(k for k in values if out[sub].get(k) != values[k])
            raise InputError(
                f"{path}: participant {sub} is listed twice with different values ({', '.join(changed)}); keep one row"
            )
        out[sub] = values
    return out


def _bids_tr(path: Path) -> float | None:
    """RepetitionTime from the BIDS JSON sidecar beside a recording (``NAME.json`` for ``NAME.nii.gz`` or an
    array ``NAME.npy``), if there is one."""
    suffix = _suffix(path)
    sidecar = path.with_name(path.name[: -len(suffix)] + ".json") if suffix else path.with_suffix(".json")
    if sidecar != path and sidecar.exists():
        try:
            tr = json.loads(sidecar.read_text()).get("RepetitionTime")
        except json.JSONDecodeError as err:
            raise InputError(f"{sidecar} is not valid JSON: {err}") from err
        return float(tr) if tr is not None else None
    return None


def _confounds_of(path: Path) -> str | None:
    """The fMRIPrep confounds table of a recording (``STEM_desc-confounds_timeseries.tsv`` beside it), if any."""
    name = path.name
    if "_space-" in name:
        stem = name[: name.index("_space-")]
    elif "_desc-" in name:
        stem = name.split("_desc-")[0]
    else:
        stem = name.split(".")[0].rsplit("_", 1)[0]  # drop the suffix (_bold)
    candidate = path.parent / f"{stem}_desc-confounds_timeseries.tsv"
    return str(candidate) if candidate.exists() else None


def _is_recording_array(p: Path) -> bool:
    return _suffix(p) in ARRAYS and p.name not in RESERVED and not p.name.endswith("_timeseries.tsv")


def discover(
    src: str | Path, kind: str = "auto", atlas_image: str | None = None, space: str | None = None
) -> tuple[list[RecordingSpec], str]:
    """The recordings under ``src`` and the source kind that was detected (bids | nifti | arrays). A derivatives
    folder with more than one output space needs ``space`` (the recordings of the others are not read)."""
    root = Path(src).resolve()
    if not root.is_dir():
        raise InputError(f"--inputs {src}: expected a folder of recordings, found no such folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    unnamed = [p for p in files if not utf8_name(p)]
    if unnamed:
        raise InputError(
            f"--inputs {src}: {len(unnamed)} file name(s) are not UTF-8 "
            f"({', '.join(ascii(str(p)) for p in unnamed[:3])}); the manifest and shards name every recording in "
            "UTF-8: rename them (e.g. `convmv -f latin1 -t utf-8 --notest -r FOLDER`) and re-run"
        )
    if not files:
        raise InputError(f"--inputs {src}: the folder is empty; expected recordings (NIfTI, BIDS or parcel arrays)")
    atlas_resolved = Path(atlas_image).resolve() if atlas_image else None
    if kind == "auto":
        if (root / "recordings.tsv").exists():  # a table of parcel arrays at the root says what the folder is
            kind = "arrays"
        elif any(p.name.endswith(PREPROC) for p in files):
            kind = "bids"
        elif any(_suffix(p) in NIFTI and p.resolve() != atlas_resolved and "atlas" not in p.name for p in files):
            kind = "nifti"
        elif any(_is_recording_array(p) for p in files):
            kind = "arrays"
        else:
            raise InputError(
                f"--inputs {src}: found no recordings; expected *_desc-preproc_bold.nii.gz (BIDS/fMRIPrep), "
                f"4D .nii/.nii.gz files, or parcel arrays ({', '.join(ARRAYS)})"
            )
    if kind == "bids":
        preproc = _in_space([p for p in files if p.name.endswith(PREPROC)], space, src)
        specs = [_spec_from_name(p, "nifti", tr=_bids_tr(p), confounds=_confounds_of(p)) for p in preproc]
    elif kind == "nifti":
        nifti = [p for p in files if _suffix(p) in NIFTI and p.resolve() != atlas_resolved and "atlas" not in p.name]
        specs = [_spec_from_name(p, "nifti", tr=_bids_tr(p)) for p in _in_space(nifti, space, src)]
    elif kind == "arrays":
        specs = _array_specs(root, files)
    else:
        raise InputError(f"--kind {kind!r}: expected auto, bids, nifti or arrays")
    specs = _disambiguate(specs)
    ids = [s.id for s in specs]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise InputError(f"--inputs {src}: recording ids {dupes[:5]} occur more than once; make file names unique")
    return specs, kind


PREPROC = ("_desc-preproc_bold.nii.gz", "_desc-preproc_bold.nii")


def _in_space(paths: list[Path], space: str | None, src: str | Path) -> list[Path]:
    """The files of one output space: ``space``, or the only one there is."""
    spaces = {p: parse_entities(p.name).get("space") for p in paths}
    found = sorted({s for s in spaces.values() if s})
    if space is not None:
        kept = [p for p in paths if spaces[p] == space]
        if not kept:
            raise InputError(
                f"--space {space}: no recording of {src} is in that space; found "
                f"{', '.join(found) or 'no space- entity'}"
            )
        return kept
    if len(found) > 1:
        counts = ", ".join(f"{s} ({sum(v == s for v in spaces.values())} files)" for s in found)
        raise InputError(
            f"--inputs {src} holds recordings in {len(found)} output spaces: {counts}; choose one with --space, "
            f"e.g. --space {found[0]} (the atlas image must be in that space)"
        )
    return paths


def _disambiguate(specs: list[RecordingSpec]) -> list[RecordingSpec]:
    """Recordings whose sub/ses/task/acq/run agree (several echoes or phase-encoding directions) get the other
    entities that tell them apart in their id; every other id stays as it is."""
    by_id: dict[str, list[RecordingSpec]] = {}
    for s in specs:
        by_id.setdefault(s.id, []).append(s)
    for group in by_id.values():
        if len(group) < 2 or any(s.entities is None for s in group):
            continue
        keys = sorted({k for s in group for k in s.entities} - {*ID_ENTITIES, "space", "desc"})
        differing = tuple(k for k in keys if len({s.entities.get(k) for s in group}) > 1)
        for s in group:
            s.id = _recording_id(s.entities, s.id, differing)
    return specs


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
        entities=ents or None,
    )


def _array_specs(root: Path, files: list[Path]) -> list[RecordingSpec]:
    table_path = root / "recordings.tsv"
    if not table_path.exists():
        return [_spec_from_name(p, "array", confounds=_confounds_of(p)) for p in files if _is_recording_array(p)]
    table = read_tsv(table_path, "recordings table", dtype=str, na_values=["n/a", ""], keep_default_na=False)
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
        try:
            tr = float(tr) if tr not in (None, "") and not pd.isna(tr) else None
        except ValueError:
            raise InputError(
                f"{table_path}: the tr of {row['file']} is {tr!r}; expected seconds as a number (e.g. 0.72) or n/a"
            ) from None
        specs.append(
            RecordingSpec(
                id=row.get("recording") or _recording_id(ents, path.name.split(".")[0]),
                path=str(path),
                subject=strip_sub(row["subject"]),
                condition=row.get("condition") or row.get("task") or ents.get("task", "unknown"),
                kind="array",
                session=row.get("session") or ents.get("ses"),
                run=row.get("run") or ents.get("run"),
                tr=tr,
                confounds=_confounds_of(path),
                entities=ents or None,
            )
        )
    return specs
