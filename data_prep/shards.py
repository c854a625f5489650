"""Stage 3 of ``data_prep build``: every shard the plan lists, written unless a current one is there.

Each shard is written to a temporary file with fixed tar metadata (so the same inputs give the same bytes) and its
per-sample checksums recorded, then renamed into place (a local store) or uploaded atomically (S3); a sidecar
``_state/shards/*.json`` records its spec, sha256 and checksums. A shard whose sidecar spec and checksum match is
skipped on a re-run.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from brainlm import atomic
from brainlm.data.format import MANIFEST, encode_sample, sample_digest
from brainlm.data.store import open_store, sha256_file, sha256_stream
from brainlm.exceptions import ShardError
from brainlm.model.scaling import RobustScaler
from data_prep.workers import Workers, progress_bar


def _parcellated_bytes(store, rec_id: str, sha256: str | None) -> bytes | None:
    """A recording's parcellated array as written, or None when it changed since (its sha256 is not its record's)."""
    data = store.read_bytes(f"parcellated/{rec_id}.npy")
    return data if hashlib.sha256(data).hexdigest() == sha256 else None


def _load_parcellated(store, rec_id: str, sha256: str) -> np.ndarray:
    """A recording's parcellated array, checked against the sha256 its record holds: an intermediate changed since
    it was parcellated is not cut into shards (a re-run of the build parcellates it again)."""
    data = _parcellated_bytes(store, rec_id, sha256)
    if data is None:
        raise ShardError(
            f"{store.url_of(f'parcellated/{rec_id}.npy')} changed since the build parcellated it (its sha256 differs "
            "from its record's); re-run the same build command: it parcellates that recording again"
        )
    return np.load(io.BytesIO(data), allow_pickle=False)


def intact(store, record: dict) -> bool:
    """Whether a parcellated recording's array is still the one its record describes (a re-run reuses only those)."""
    key = f"parcellated/{record['id']}.npy"
    return store.exists(key) and _parcellated_bytes(store, record["id"], record.get("npy_sha256")) is not None


def _sample_meta(rec: dict, subjects: dict[str, dict]) -> dict:
    return {
        "recording": rec["id"],
        "subject": rec["subject"],
        "session": rec.get("session"),
        "run": rec.get("run"),
        "condition": rec["condition"],
        "tr": rec["tr"],
        "split": rec["split"],
        "phenotypes": subjects.get(rec["subject"], {}),
    }


def _upload_temporary() -> Path:
    fd, tmp = tempfile.mkstemp(suffix=".tar", prefix=f"{UPLOAD_PREFIX}{os.getpid()}-")
    os.close(fd)
    return Path(tmp)


UPLOAD_PREFIX = "brainlm-shard-"


def remove_dead_uploads() -> int:
    """Temporary shards (for S3) of writer processes that no longer run: a killed build's leftovers."""
    removed = 0
    for p in Path(tempfile.gettempdir()).glob(f"{UPLOAD_PREFIX}*.tar"):
        try:
            pid = int(p.name[len(UPLOAD_PREFIX) :].split("-", 1)[0])
            os.kill(pid, 0)
        except ValueError:
            continue
        except ProcessLookupError:
            p.unlink(missing_ok=True)
            removed += 1
        except PermissionError:  # another user's live process
            continue
    return removed


# -- stage 3: shards ----------------------------------------------------------------------------------------


def _sidecar(shard: dict) -> str:
    return f"_state/{shard['key'].removesuffix('.tar')}.json"


def shard_is_current(store, shard: dict) -> bool:
    """True when the shard exists, its sidecar spec matches the plan, and its checksum matches the sidecar."""
    if not store.exists(_sidecar(shard)) or not store.exists(shard["key"]):
        return False
    side = json.loads(store.read_bytes(_sidecar(shard)))
    if side.get("spec") != shard["spec"] or store.size(shard["key"]) != side.get("bytes"):
        return False
    if store.local:
        return sha256_file(store.url_of(shard["key"]))[0] == side.get("sha256")
    # On S3 the checksum travels with the object as metadata, set in the same atomic upload; a store that keeps no
    # metadata (gs://, az:// through fsspec) is read back.
    stored = store.metadata(shard["key"]).get("sha256")
    if stored is None:
        with store.open(shard["key"]) as f:
            stored = sha256_stream(f)[0]
    return stored == side.get("sha256")


def _write_shard(job: tuple[dict, dict, dict[str, str], dict, int, str]) -> dict:
    import webdataset as wds

    shard, recs, shas, scaling, crop, store_url = job
    store = open_store(store_url)
    scaler = RobustScaler.from_dict(scaling)
    cache: dict[str, np.ndarray] = {}
    # Locally the shard is written beside its destination and renamed into place (no copy; a killed writer leaves a
    # dot-file the next build removes); for S3 in this machine's temp folder, named by process so the next build
    # can remove what a killed one left.
    local = store.local
    tmp = atomic.temporary(Path(store.url_of(shard["key"]))) if local else _upload_temporary()
    digests = []
    try:
        with open(tmp, "wb") as f, wds.TarWriter(f, mtime=0, user="brainlm", group="brainlm") as sink:
            for rec_id, start in shard["items"]:
                if rec_id not in cache:
                    cache[rec_id] = scaler.transform(_load_parcellated(store, rec_id, shas[rec_id]))
                crop_RT = cache[rec_id][:, start : start + crop]
                if not np.isfinite(crop_RT.astype(np.float16)).all():
                    raise ShardError(f"{rec_id} at {start}: values overflow float16 after scaling")
                meta = recs[rec_id] | {"start": start, "n_timepoints": crop}
                sample = encode_sample(rec_id, start, crop_RT, meta)
                digests.append(sample_digest(sample["signal.npy"], sample["json"]))
                sink.write(sample)
            f.flush()
            os.fsync(f.fileno())
        sha, size = sha256_file(tmp)
        if local:
            os.replace(tmp, store.url_of(shard["key"]))
        else:
            store.upload_file(tmp, shard["key"], metadata={"sha256": sha})
    finally:
        Path(tmp).unlink(missing_ok=True)
    side = {
        "key": shard["key"],
        "split": shard["split"],
        "samples": len(shard["items"]),
        "bytes": size,
        "sha256": sha,
        "spec": shard["spec"],
        "digests": digests,
    }
    store.write_bytes(_sidecar(shard), json.dumps(side, sort_keys=True).encode())
    return side


def write_shards(cfg, plan: dict, workers: Workers) -> dict[str, int]:
    """Stage 3: write every shard that is not already current. Returns counts."""
    store = open_store(cfg.out)
    if store.exists(MANIFEST):
        old = json.loads(store.read_bytes(MANIFEST))
        if old.get("plan_sha256") != plan["plan_sha256"]:
            store.delete(MANIFEST)  # it describes other data: uncommit before touching any shard
    todo = [s for s in plan["shards"] if not shard_is_current(store, s)]
    subjects = plan["subjects"]
    by_id = {r["id"]: r for r in plan["recordings"]}
    jobs = [
        (
            s,
            {rid: _sample_meta(by_id[rid], subjects) for rid in {i for i, _ in s["items"]}},
            {rid: by_id[rid]["npy_sha256"] for rid, _ in s["items"]},
            plan["scaling"],
            plan["crop"],
            store.url,
        )
        for s in todo
    ]
    written = 0
    if jobs:
        progress = progress_bar(sum(len(s["items"]) for s in todo), "shards", "crop", cfg.progress)
        start = time.time()
        for side in workers.map(_write_shard, jobs):
            written += side["bytes"]
            progress.update(side["samples"])
            progress.set_postfix_str(
                f"{written / 2**20:.0f} MiB, {written / 2**20 / max(time.time() - start, 1e-9):.1f} MiB/s"
            )
        progress.close()
    return {"written": len(todo), "skipped": len(plan["shards"]) - len(todo), "bytes": written}
