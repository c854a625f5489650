"""The data contract between data_prep and everything downstream: samples, shards and the manifest.

A shard is a WebDataset tar at ``shards/{split}/{split}-{index:06d}.tar`` holding samples
``KEY.signal.npy`` (``[R, T_crop]`` float16, robust-scaled) and ``KEY.json`` (subject, recording, start,
TR, condition, phenotypes). ``manifest.json`` at the prefix root is written last and is the commit point:
what it lists exists and matches its sha256.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from brainlm.exceptions import ShardError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")


def shard_key(split: str, index: int) -> str:
    return f"shards/{split}/{split}-{index:06d}.tar"


def sample_key(recording: str, start: int) -> str:
    # WebDataset splits a member name at the first dot: keys must not contain one.
    return f"{recording.replace('.', '-')}_t{start:05d}"


def encode_sample(recording: str, start: int, signal_RT: np.ndarray, meta: dict[str, Any]) -> dict[str, Any]:
    """A WebDataset sample dict: ``signal.npy`` (float16) + ``json``."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(signal_RT, dtype=np.float16), allow_pickle=False)
    return {
        "__key__": sample_key(recording, start),
        "signal.npy": buf.getvalue(),
        "json": json.dumps(meta, sort_keys=True).encode(),
    }


def sample_digest(signal_npy: bytes, meta_json: bytes) -> str:
    """A sample's checksum (the bytes of both its members), as the manifest lists it and the loader verifies it."""
    import hashlib

    h = hashlib.blake2b(digest_size=8)
    h.update(signal_npy)
    h.update(meta_json)
    return h.hexdigest()


def decode_signal(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


@dataclass
class Atlas:
    """Parcel names, MNI coordinates (mm) and optional network labels, in the order of the signal rows."""

    name: str
    labels: list[str]
    coords_mm: list[list[float]]
    networks: list[str] | None = None

    def __post_init__(self) -> None:
        n = len(self.labels)
        if len(self.coords_mm) != n or (self.networks is not None and len(self.networks) != n):
            raise ShardError(
                f"atlas {self.name!r}: {n} labels but {len(self.coords_mm)} coordinates"
                + (f" and {len(self.networks)} networks" if self.networks is not None else "")
                + "; every parcel needs one of each"
            )

    @property
    def num_parcels(self) -> int:
        return len(self.labels)

    def coords(self) -> np.ndarray:
        return np.asarray(self.coords_mm, dtype=np.float32).reshape(-1, 3)


@dataclass
class Manifest:
    """``manifest.json``: everything needed to read, scale back and audit a shard set."""

    atlas: Atlas
    scaling: dict[str, Any]
    crop: int
    stride: int
    tr: float
    splits: dict[str, dict[str, Any]]
    shards: list[dict[str, Any]]
    recordings: list[dict[str, Any]] = field(default_factory=list)
    subjects: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    orientation: dict[str, int] = field(default_factory=dict)
    dtype: str = "float16"
    format_version: int = FORMAT_VERSION
    data_prep_version: str = ""
    created: str = ""
    args: dict[str, Any] = field(default_factory=dict)
    plan_sha256: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "manifest") -> Manifest:
        if not isinstance(d, dict):
            raise ShardError(f"{source}: expected a JSON object, got {type(d).__name__}")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ShardError(
                f"{source}: format_version {version!r} is not the supported {FORMAT_VERSION}; "
                "rebuild the shards with this version of `python -m data_prep build`"
            )
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        required = {"atlas", "scaling", "crop", "stride", "tr", "splits", "shards"}
        missing = sorted(required - set(d))
        if unknown or missing:
            raise ShardError(f"{source}: missing fields {missing}, unknown fields {unknown}")
        kwargs = dict(d)
        kwargs["atlas"] = Atlas(**d["atlas"])
        check_shards(d["shards"], d["splits"], source)
        return cls(**kwargs)

    def shards_of(self, split: str) -> list[dict[str, Any]]:
        return [s for s in self.shards if s["split"] == split]

    def num_samples(self, split: str) -> int:
        return sum(s["samples"] for s in self.shards_of(split))

    def subjects_of(self, split: str) -> list[str]:
        return list(self.splits.get(split, {}).get("subjects", []))

    def recordings_of(self, split: str) -> list[dict[str, Any]]:
        return [r for r in self.recordings if r.get("split") == split]


def check_shards(shards: Any, splits: Any, source: str) -> None:
    """The shard list agrees with itself and with the splits: every entry complete, one checksum per sample, no
    shard listed twice, each split's sample count the sum of its shards'. A manifest that fails is not read."""
    fix = "; rebuild the shard set (python -m data_prep build with its arguments) or restore its manifest.json"
    if not isinstance(shards, list) or not isinstance(splits, dict):
        raise ShardError(f"{source}: 'shards' must be a list and 'splits' an object{fix}")
    seen: set[str] = set()
    for i, shard in enumerate(shards):
        missing = [k for k in ("url", "split", "samples", "bytes", "sha256", "digests") if k not in shard]
        if missing:
            raise ShardError(f"{source}: shard entry {i} lacks {', '.join(missing)}{fix}")
        url, n = shard["url"], shard["samples"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ShardError(f"{source}: shard {url} lists {n!r} samples; expected a count{fix}")
        if not isinstance(shard["digests"], list) or len(shard["digests"]) != n:
            got = len(shard["digests"]) if isinstance(shard["digests"], list) else type(shard["digests"]).__name__
            raise ShardError(f"{source}: shard {url} lists {n} samples but {got} sample checksums{fix}")
        if url in seen:
            raise ShardError(f"{source}: shard {url} is listed twice{fix}")
        if shard["split"] not in splits:
            raise ShardError(f"{source}: shard {url} is in split {shard['split']!r}, not one of {sorted(splits)}{fix}")
        seen.add(url)
    for name, info in splits.items():
        total = sum(s["samples"] for s in shards if s["split"] == name)
        if isinstance(info, dict) and "samples" in info and info["samples"] != total:
            raise ShardError(f"{source}: split {name!r} lists {info['samples']} samples, its shards {total}{fix}")
