"""``data_prep build``: inputs -> parcellated recordings -> plan (splits, scaling, crops) -> shards -> manifest.

Stages and what makes each resumable (all state lives in the destination store):

1. parcellate  every recording to ``parcellated/{id}.npy`` (float32 [R, T], unscaled) plus a record
               ``parcellated/{id}.json`` written after it (QC result, TR, orientation, input fingerprint).
               A record whose fingerprint matches is reused. Can be split across machines (``--part i/n``).
2. plan        splits by subject, robust scaling fitted on training recordings, crops assigned to shards;
               every shard gets a spec hash of exactly what goes into it. Saved as ``_state/plan.json``.
3. shards      (data_prep/shards.py) each shard is written to a temporary file with fixed tar metadata (so
               the same inputs give the same bytes) and per-sample checksums, then renamed or uploaded
               atomically; a sidecar ``_state/shards/*.json`` records its spec and sha256. A shard whose
               sidecar spec matches and whose checksum matches is skipped on a re-run.
4. manifest    written last, atomically: the commit point. An older manifest that disagrees with the
               new plan is deleted before any shard is written, so no manifest ever claims stale data.

About 600 lines in one file on purpose: the stages read in order; what a recording is lives in brainlm.recordings,
the shard writing in data_prep/shards.py.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import io
import json
import logging
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from brainlm._version import __version__
from brainlm.data.format import MANIFEST, SPLITS, Manifest, shard_key
from brainlm.data.store import open_store
from brainlm.exceptions import BrainLMError, InputError, StoreError
from brainlm.lock import FolderLock
from brainlm.model.scaling import NORMALIZE, RobustScaler
from brainlm.recordings.atlas import AtlasSource, load_atlas
from brainlm.recordings.parcellate import Cleaning, clean_array, load_array, orient, parcellate_nifti, resample_time
from brainlm.recordings.qc import check_length, check_signal, check_tr
from brainlm.recordings.sources import RecordingSpec, discover, find_participants, read_participants, strip_sub
from brainlm.recordings.tables import read_tsv
from data_prep.shards import _load_parcellated, _sample_meta, _sidecar, intact, remove_dead_uploads, write_shards
from data_prep.workers import Workers, progress_bar

log = logging.getLogger(__name__)

STAGES = ("all", "parcellate", "plan", "shards", "manifest")
PLAN = "_state/plan.json"
BYTES_PER_SAMPLE_OVERHEAD = 2048  # tar headers + json metadata, roughly


class BuildError(BrainLMError):
    """The build cannot go on (nothing usable, inconsistent splits ...)."""


@dataclass
class BuildConfig:
    inputs: str
    """Folder: BIDS/fMRIPrep derivatives, 4D NIfTI files, or parcel arrays (.npy/.mat/.tsv/.csv, with recordings.tsv
    or BIDS-style names)."""
    out: str
    """Destination: a local folder or s3://bucket/prefix."""
    kind: str = "auto"
    """Input kind: auto (detect), bids, nifti or arrays."""
    atlas: str | None = None
    """Atlas image: 3D label image (NiftiLabelsMasker) or 4D maps (NiftiMapsMasker)."""
    atlas_table: str | None = None
    """TSV/CSV with name, x, y, z (MNI mm)[, network, index]; default INPUTS/atlas.tsv."""
    tr: float | None = None
    """Expected TR in seconds; recordings with another TR are skipped (default: the most common TR)."""
    resample: bool = False
    """Resample recordings to --tr instead of skipping them."""
    resample_atlas: bool = False
    """Let nilearn resample the atlas to each image instead of refusing a grid mismatch."""
    confounds: list[str] | None = None
    """Confound columns to regress out: of fMRIPrep's *_desc-confounds_timeseries.tsv beside each image or array (a
    missing value, as in the first row of derivatives, takes the column mean)."""
    denoise: str = "none"
    """fMRIPrep denoising through nilearn's load_confounds_strategy: simple (motion, white matter / CSF, cosine
    high-pass), scrubbing (simple + high-motion frames removed), compcor, or none."""
    high_pass: float | None = None
    """High-pass cutoff in Hz given to the masker (with each recording's TR), e.g. 0.008."""
    space: str | None = None
    """Output space of a derivatives folder holding several (e.g. MNI152NLin2009cAsym); default the only one."""
    participants: str | None = None
    """participants.tsv (phenotypes); default INPUTS/participants.tsv or that of the BIDS dataset INPUTS derives
    from (dataset_description.json SourceDatasets, or the folder above derivatives/)."""
    normalize: str = "demean"
    """Per-recording normalisation before the robust scaling: demean (remove each parcel's median), psc (percent
    signal change, for raw BOLD intensities) or none."""
    crop: int = 200
    """Timepoints per crop."""
    stride: int | None = None
    """Step between crop starts (default crop // 2)."""
    val_frac: float = 0.1
    """Share of subjects in val."""
    test_frac: float = 0.1
    """Share of subjects in test."""
    splits: str | None = None
    """TSV with subject and split (train/val/test): explicit assignment."""
    workers: int = 1
    """Processes for parcellation and shard writing."""
    seed: int = 0
    """Seed of the split and shuffle."""
    shard_mb: float = 256.0
    """Target shard size in MiB."""
    samples_per_shard: int | None = None
    """Crops per shard (overrides --shard-mb)."""
    max_fit_recordings: int = 2000
    """Training recordings the robust scaler is fitted on (a seeded subset beyond this)."""
    stage: str = "all"
    """Run one stage only (for clusters): all, parcellate, plan, shards or manifest."""
    part: str | None = None
    """I/N: parcellate only every N-th recording from the I-th (an Indexed Job's pod)."""
    progress: bool = True
    """Progress bars (--no-progress or --quiet to turn them off)."""

    def __post_init__(self) -> None:
        if self.stride is None:
            self.stride = max(1, self.crop // 2)
        if self.crop <= 0 or self.stride <= 0:
            raise InputError(f"--crop ({self.crop}) and --stride ({self.stride}) must be positive")
        if not (0 <= self.val_frac < 1 and 0 <= self.test_frac < 1 and self.val_frac + self.test_frac < 1):
            raise InputError(
                f"--val-frac ({self.val_frac}) and --test-frac ({self.test_frac}) must be in [0, 1) and sum below 1"
            )
        if self.normalize not in NORMALIZE:
            raise InputError(f"--normalize {self.normalize!r}: expected one of {', '.join(NORMALIZE)}")
        if self.stage not in STAGES:
            raise InputError(f"--stage {self.stage!r}: expected one of {', '.join(STAGES)}")
        if self.tr is not None and not (math.isfinite(self.tr) and self.tr > 0):
            raise InputError(f"--tr must be a positive number of seconds, got {self.tr}")
        if self.resample and self.tr is None:
            raise InputError("--resample needs --tr SECONDS: the TR to resample every recording to")
        if self.workers < 1:
            raise InputError(f"--workers must be at least 1, got {self.workers}")
        if "://" not in str(self.out) and Path(self.inputs).resolve() in Path(self.out).resolve().parents:
            raise InputError(
                f"--out {self.out} lies inside --inputs {self.inputs}: its shards and intermediates would be read as "
                "inputs by the next build; give a folder outside the inputs"
            )
        for flag, path, what in (
            ("--splits", self.splits, "a TSV with columns subject and split"),
            ("--participants", self.participants, "a BIDS participants.tsv"),
        ):
            if path and not Path(path).is_file():  # before any work, not after the parcellation
                raise InputError(f"{flag} {path}: no such file; expected {what}")


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# -- stage 1: parcellate ------------------------------------------------------------------------------------


def _fingerprint(spec: RecordingSpec, atlas: AtlasSource, cfg: BuildConfig) -> str:
    st = os.stat(spec.path) if os.path.exists(spec.path) else None
    return _sha(
        {
            "spec": spec.to_dict(),
            "size": st.st_size if st else None,
            "mtime_ns": st.st_mtime_ns if st else None,
            "atlas": atlas.sha256,
            "tr": cfg.tr,
            "resample": cfg.resample,
            "resample_atlas": cfg.resample_atlas,
            "confounds": cfg.confounds,
            # new settings enter the fingerprint only when used, so earlier builds resume as they were
            **{k: v for k, v in (("denoise", cfg.denoise), ("high_pass", cfg.high_pass)) if v not in (None, "none")},
        }
    )


def _first_given(*values: float | None) -> float | None:
    """The first TR that is given at all (0 and negative ones included: check_tr refuses them, saying why)."""
    return next((v for v in values if v is not None), None)


def _parcellate_one(job: tuple[RecordingSpec, AtlasSource, dict, str, str]) -> dict:
    spec, atlas, params, store_url, fingerprint = job
    store = open_store(store_url)
    record = {**spec.to_dict(), "fingerprint": fingerprint, "status": "ok", "reason": None}
    if record.get("tr") is not None and not math.isfinite(record["tr"]):
        record["tr"] = None  # an infinite TR is refused below, saying so; the record stays strict JSON
    try:
        cleaning = params["cleaning"]
        if spec.kind == "nifti":
            signal, header_tr, done = parcellate_nifti(spec, atlas, cleaning)
            tr, orientation = _first_given(spec.tr, header_tr, params["tr"]), "RT"
            record.update(done)
        else:
            if not os.path.exists(spec.path):
                raise InputError(f"{spec.path}: listed in recordings.tsv but the file does not exist")
            signal, orientation = orient(load_array(spec.path), atlas.atlas.num_parcels, spec.path)
            tr = _first_given(spec.tr, params["tr"])
            check_tr(tr, None, spec.path, params["resample"])  # a TR of 0 or below is refused, not read as missing
            signal = clean_array(signal, spec, cleaning, tr)
            if cleaning.confounds:
                record["confound_columns"] = cleaning.confounds
        check_tr(tr, params["tr"], spec.path, params["resample"])
        if params["resample"] and abs(tr - params["tr"]) > 1e-3:
            record["source_tr"] = float(tr)
            signal, tr = resample_time(signal, tr, params["tr"]), params["tr"]
        if record.get("frames_scrubbed"):  # too short to crop: say so before QC reads what regression left
            check_length(signal.shape[1], params["crop"], spec.path, record["frames_scrubbed"])
        check_signal(signal, atlas.atlas.labels, spec.path)
        buf = io.BytesIO()
        np.save(buf, signal, allow_pickle=False)
        data = buf.getvalue()
        record.update(
            tr=float(tr),
            n_timepoints=int(signal.shape[1]),
            orientation=orientation,
            npy_sha256=hashlib.sha256(data).hexdigest(),
        )
    except InputError as err:
        record.update(status="skipped", reason=str(err))
    except Exception as err:  # reading or checking the input failed: a skip with its reason, the build goes on
        record.update(status="skipped", reason=f"{spec.path}: unreadable ({type(err).__name__}: {err})")
    else:
        _write(store, f"parcellated/{spec.id}.npy", data)
    # The record last: a re-run trusts what it finds only when both were written (an output failure leaves neither).
    _write(store, f"parcellated/{spec.id}.json", json.dumps(record, sort_keys=True, allow_nan=False).encode())
    return record


def _write(store, key: str, data: bytes) -> None:
    """A write of the build's own output. Its failure (a full disk, an I/O error, a store that does not answer) is
    the output's fault, not the recording's: the build stops saying what happened where, and a re-run retries it."""
    try:
        store.write_bytes(key, data)
    except Exception as err:
        full = isinstance(err, OSError) and err.errno == errno.ENOSPC
        raise StoreError(
            f"the build could not write {store.url_of(key)}: "
            + ("the disk is full (No space left on device)" if full else f"{type(err).__name__}: {err}")
            + "; nothing of it was kept: free space or fix the store, then re-run the same command (it resumes)"
        ) from err


def parcellate(cfg: BuildConfig, specs: list[RecordingSpec], atlas: AtlasSource, workers: Workers) -> list[dict]:
    """Stage 1. Returns one record per spec (reused when its fingerprint matches)."""
    store = open_store(cfg.out)
    params = {
        "tr": cfg.tr,
        "resample": cfg.resample,
        "cleaning": Cleaning(cfg.denoise, cfg.confounds, cfg.high_pass, cfg.resample_atlas),
        "crop": cfg.crop,
    }
    records: dict[str, dict] = {}
    jobs = []
    for spec in specs:
        fp = _fingerprint(spec, atlas, cfg)
        key = f"parcellated/{spec.id}.json"
        if store.exists(key):
            old = json.loads(store.read_bytes(key))
            if old.get("fingerprint") == fp and (old["status"] != "ok" or intact(store, old)):
                records[spec.id] = old
                continue
        jobs.append((spec, atlas, params, store.url, fp))
    if jobs:
        progress = progress_bar(len(jobs), "parcellate", "rec", cfg.progress)
        for rec in workers.map(_parcellate_one, jobs):
            records[rec["id"]] = rec
            progress.update()
        progress.close()
    reused = len(specs) - len(jobs)
    if reused:
        log.info(f"parcellate: reused {reused} recording(s) parcellated by an earlier run")
    return [records[s.id] for s in specs]


# -- stage 2: plan ------------------------------------------------------------------------------------------


def read_split_file(path: str) -> dict[str, str]:
    """subject -> split from a TSV/CSV; a subject listed twice is an error (in two splits it would leak)."""
    if not Path(path).is_file():
        raise InputError(f"--splits {path}: no such file; expected a TSV with columns subject and split")
    table = read_tsv(path, "--splits", sep="\t" if not path.endswith(".csv") else ",", dtype=str)
    table.columns = [c.strip().lower() for c in table.columns]
    sub_col = "subject" if "subject" in table else "participant_id" if "participant_id" in table else None
    if sub_col is None or "split" not in table:
        raise InputError(
            f"--splits {path}: expected columns subject (or participant_id) and split, got {list(table.columns)}"
        )
    bad = sorted(set(table["split"]) - set(SPLITS))
    if bad:
        raise InputError(f"--splits {path}: split values {bad} are not one of {', '.join(SPLITS)}")
    out: dict[str, str] = {}
    for sub, split in zip(table[sub_col], table["split"], strict=True):
        sub = strip_sub(sub)
        if sub in out:
            which = f"in {out[sub]} and {split}" if out[sub] != split else f"twice in {split}"
            raise InputError(f"--splits {path}: subject {sub} is listed {which}; list every subject once")
        out[sub] = split
    return out


def assign_splits(subjects: list[str], cfg: BuildConfig) -> dict[str, str]:
    """Split by subject: explicit (``--splits``) or deterministic from the subject id and the seed.

    Subjects are ordered by a hash of (seed, id); the first ``round(test_frac * n)`` go to test, the next
    ``round(val_frac * n)`` to val (at least one each when the fraction is positive and n >= 3).
    """
    subjects = sorted(set(subjects))
    if cfg.splits:
        explicit = read_split_file(cfg.splits)
        missing = [s for s in subjects if s not in explicit]
        if missing:
            raise InputError(
                f"--splits {cfg.splits}: {len(missing)} subject(s) have no split (e.g. {missing[:5]}); "
                "list every subject, or drop --splits to split by hash"
            )
        unknown = sorted(set(explicit) - set(subjects))
        if unknown:
            log.warning(
                f"--splits {cfg.splits} lists {len(unknown)} subject(s) with no usable recording: "
                f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}"
            )
        return {s: explicit[s] for s in subjects}
    order = sorted(subjects, key=lambda s: hashlib.sha256(f"{cfg.seed}:{s}".encode()).hexdigest())
    n = len(order)

    def count(frac: float) -> int:
        k = round(frac * n)
        return max(k, 1) if frac > 0 and n >= 3 else k

    n_test, n_val = count(cfg.test_frac), count(cfg.val_frac)
    out = {s: "test" for s in order[:n_test]}
    out.update({s: "val" for s in order[n_test : n_test + n_val]})
    out.update({s: "train" for s in order[n_test + n_val :]})
    return out


def samples_per_shard(cfg: BuildConfig, num_parcels: int) -> int:
    if cfg.samples_per_shard:
        return cfg.samples_per_shard
    per_sample = num_parcels * cfg.crop * 2 + BYTES_PER_SAMPLE_OVERHEAD
    return max(1, int(cfg.shard_mb * 2**20 // per_sample))


def make_plan(cfg: BuildConfig, records: list[dict], atlas: AtlasSource, phenotypes: dict[str, dict]) -> dict:
    """Stage 2: splits, scaling statistics, and the exact content of every shard."""
    store = open_store(cfg.out)
    skipped = [
        {"recording": r["id"], "source": r["path"], "reason": r["reason"]} for r in records if r["status"] != "ok"
    ]
    ok = [r for r in records if r["status"] == "ok"]
    tr = cfg.tr
    if tr is None and ok:
        tr = Counter(round(r["tr"], 4) for r in ok).most_common(1)[0][0]
    usable = []
    for r in ok:
        try:
            check_tr(r["tr"], tr, r["path"], resample=False)
            check_length(r["n_timepoints"], cfg.crop, r["path"], r.get("frames_scrubbed", 0))
        except InputError as err:
            skipped.append({"recording": r["id"], "source": r["path"], "reason": str(err)})
            continue
        usable.append(r)
    if not usable:
        reasons = "\n  ".join(f"{s['recording']}: {s['reason']}" for s in skipped[:10])
        raise BuildError(f"every recording was skipped ({len(skipped)}); nothing to build. First reasons:\n  {reasons}")

    split_of = assign_splits([r["subject"] for r in usable], cfg)
    for r in usable:
        r["split"] = split_of[r["subject"]]
    train = [r for r in usable if r["split"] == "train"]
    if not train:
        raise BuildError("the train split is empty: lower --val-frac/--test-frac or add subjects")
    fit_on = sorted(train, key=lambda r: hashlib.sha256(f"{cfg.seed}:{r['id']}".encode()).hexdigest())
    fit_on = fit_on[: cfg.max_fit_recordings]
    scaler = RobustScaler.fit((_load_parcellated(store, r["id"], r["npy_sha256"]) for r in fit_on), cfg.normalize)
    scaling = scaler.to_dict()

    per_shard = samples_per_shard(cfg, atlas.atlas.num_parcels)
    rng = np.random.default_rng(cfg.seed)
    shards, split_info = [], {}
    for split in SPLITS:
        recs = sorted((r for r in usable if r["split"] == split), key=lambda r: r["id"])
        recs = [recs[i] for i in rng.permutation(len(recs))]
        items = [(r["id"], s) for r in recs for s in range(0, r["n_timepoints"] - cfg.crop + 1, cfg.stride)]
        for r in recs:
            r["n_crops"] = len(range(0, r["n_timepoints"] - cfg.crop + 1, cfg.stride))
        split_info[split] = {
            "subjects": sorted({r["subject"] for r in recs}),
            "recordings": len(recs),
            "samples": len(items),
        }
        for index, start in enumerate(range(0, len(items), per_shard)):
            chunk = items[start : start + per_shard]
            chunk = [chunk[i] for i in rng.permutation(len(chunk))]
            shards.append({"key": shard_key(split, index), "split": split, "index": index, "items": chunk})

    by_id = {r["id"]: r for r in usable}
    subjects = {s: phenotypes.get(s, {}) for s in sorted({r["subject"] for r in usable})}
    scaling_sha = _sha(scaling)
    for shard in shards:
        ids = sorted({rid for rid, _ in shard["items"]})
        shard["spec"] = _sha(
            {
                "format": 1,
                "crop": cfg.crop,
                "items": shard["items"],
                "recordings": [_sample_meta(by_id[i], subjects) | {"npy": by_id[i]["npy_sha256"]} for i in ids],
                "scaling": scaling_sha,
            }
        )
    recordings = [
        {
            k: r[k]
            for k in (
                "id",
                "subject",
                "session",
                "run",
                "condition",
                "tr",
                "n_timepoints",
                "n_crops",
                "orientation",
                "split",
                "npy_sha256",
            )
        }
        | {"source": r["path"]}
        # what newer builds record beside: every BIDS entity, the TR before resampling, the cleaning done
        | {k: r[k] for k in ("entities", "source_tr", "denoise", "frames_scrubbed", "confound_columns") if r.get(k)}
        for r in sorted(usable, key=lambda r: r["id"])
    ]
    plan = {
        "tr": tr,
        "crop": cfg.crop,
        "stride": cfg.stride,
        "scaling": scaling,
        "splits": split_info,
        "shards": shards,
        "recordings": recordings,
        "subjects": subjects,
        "skipped": skipped,
        "orientation": dict(Counter(r["orientation"] for r in usable)),
    }
    plan["plan_sha256"] = _sha(
        {"shards": [s["spec"] for s in shards], "scaling": scaling_sha, "atlas": asdict(atlas.atlas)}
    )
    return plan


# -- stage 4: manifest --------------------------------------------------------------------------------------


def write_manifest(cfg: BuildConfig, plan: dict, atlas: AtlasSource) -> Manifest:
    store = open_store(cfg.out)
    shards = []
    for s in plan["shards"]:
        if not store.exists(_sidecar(s)):
            raise BuildError(f"shard {s['key']} was not written; run the shards stage (or the whole build) again")
        side = json.loads(store.read_bytes(_sidecar(s)))
        if side["spec"] != s["spec"] or not store.exists(s["key"]) or store.size(s["key"]) != side["bytes"]:
            raise BuildError(f"shard {s['key']} does not match the plan; run the build again to rewrite it")
        entry = {k: side[k] for k in ("split", "samples", "bytes", "sha256")} | {"url": s["key"]}
        if "digests" in side:  # per-sample checksums: what the loader verifies as it reads
            entry["digests"] = side["digests"]
        shards.append(entry)
    planned = {s["key"] for s in plan["shards"]}
    for key in store.list("shards"):
        if key not in planned:  # left over from an earlier, different build
            store.delete(key)
    args = {k: v for k, v in asdict(cfg).items() if k != "progress"}
    manifest = Manifest(
        atlas=atlas.atlas,
        scaling=plan["scaling"],
        crop=plan["crop"],
        stride=plan["stride"],
        tr=plan["tr"],
        splits=plan["splits"],
        shards=shards,
        recordings=plan["recordings"],
        subjects=plan["subjects"],
        skipped=plan["skipped"],
        orientation=plan["orientation"],
        data_prep_version=__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        args=args,
        plan_sha256=plan["plan_sha256"],
    )
    store.write_bytes(MANIFEST, json.dumps(manifest.to_dict(), indent=1, allow_nan=False).encode())
    return manifest


# -- the whole build ----------------------------------------------------------------------------------------


def _parse_part(part: str | None) -> tuple[int, int] | None:
    if part is None:
        return None
    try:
        i, n = (int(v) for v in part.split("/"))
        assert 0 <= i < n
    except (ValueError, AssertionError):
        raise InputError(f"--part {part!r}: expected I/N with 0 <= I < N, e.g. 3/8") from None
    return i, n


def build(cfg: BuildConfig) -> Manifest | None:
    """Run the requested stage(s). Returns the manifest when the manifest stage ran."""
    if importlib.util.find_spec("webdataset") is None:  # before any parcellation, not after it
        raise BuildError(
            "python -m data_prep build writes WebDataset shards and needs the [data] extra: "
            "pip install 'brainlm[data]' (from a clone: pip install -e '.[data]')"
        )
    store = open_store(cfg.out)
    part = _parse_part(cfg.part)
    # One build per local folder, locked before anything is cleaned or written (parts of one build, --part I/N, run
    # side by side by design and take no lock).
    lock = FolderLock(store.url, "a shard build") if store.local and part is None else None
    if lock is not None:
        lock.acquire()
    try:
        return _build(cfg, store, part)
    finally:
        if lock is not None:
            lock.release()


def _build(cfg: BuildConfig, store, part: tuple[int, int] | None) -> Manifest | None:
    if store.local:
        store.remove_stale_temporaries()
    remove_dead_uploads()
    inputs = Path(cfg.inputs)
    if not inputs.is_dir():
        raise InputError(
            f"--inputs {cfg.inputs}: no such folder; expected a folder of recordings (BIDS, NIfTI or arrays)"
        )
    if not any(inputs.iterdir()):
        raise InputError(f"--inputs {cfg.inputs}: the folder is empty; expected recordings (BIDS, NIfTI or arrays)")
    atlas_table = cfg.atlas_table or (str(inputs / "atlas.tsv") if (inputs / "atlas.tsv").exists() else None)
    atlas = load_atlas(cfg.atlas, atlas_table)
    specs, kind = discover(cfg.inputs, cfg.kind, cfg.atlas, cfg.space)
    if kind in ("bids", "nifti") and atlas.image is None:
        raise InputError(
            f"--inputs {cfg.inputs} holds NIfTI images ({kind}); pass --atlas LABELS.nii.gz to parcellate them"
        )
    phenotypes = read_participants(Path(cfg.participants) if cfg.participants else find_participants(inputs))
    if cfg.splits:
        read_split_file(cfg.splits)  # a bad splits file is said before anything is parcellated
    log.info(
        f"build: {len(specs)} {kind} recording(s), atlas {atlas.atlas.name} "
        f"({atlas.atlas.num_parcels} parcels) -> {store.url}"
    )

    workers = Workers(cfg.workers)
    try:
        if cfg.stage in ("all", "parcellate", "plan"):
            mine = [s for i, s in enumerate(specs) if part is None or i % part[1] == part[0]]
            records = parcellate(cfg, mine, atlas, workers)
            if cfg.stage == "parcellate":
                return None
            if part is not None:  # the other parts' records (parcellating whatever they left undone)
                records = parcellate(cfg, specs, atlas, workers)
            plan = make_plan(cfg, records, atlas, phenotypes)
            store.write_bytes(PLAN, json.dumps(plan, allow_nan=False).encode())
            if cfg.stage == "plan":
                return None
        else:
            if not store.exists(PLAN):
                raise BuildError(f"no plan under {store.url}; run the plan stage first (or --stage all)")
            plan = json.loads(store.read_bytes(PLAN))
        if cfg.stage in ("all", "shards"):
            counts = write_shards(cfg, plan, workers)
            log.info(f"shards: wrote {counts['written']}, skipped {counts['skipped']} already current (checksum match)")
            if cfg.stage == "shards":
                return None
        return write_manifest(cfg, plan, atlas)
    finally:
        workers.close()
