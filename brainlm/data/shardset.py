"""A built shard set as one value: its manifest and where it lives, with the URLs of its shards and their check.

``ShardSet.open(url)`` reads ``manifest.json`` under a folder or an object-store prefix (``brainlm.data.store``);
every reader (the training loader, the analyses, ``data_prep inspect``) starts from it, so the URL is parsed once
and shard URLs are always resolved against the set's own root.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from brainlm.data.format import MANIFEST, Manifest
from brainlm.data.store import Store, open_store, sha256_stream, split_url
from brainlm.exceptions import ShardError
from brainlm.progress import bar


@dataclass
class ShardInfo:
    """One shard as a reader needs it: its full URL, its samples, their checksums and its bytes."""

    url: str
    samples: int
    digests: list[str] | None = None  # per-sample checksums from the manifest (None: not checked)
    size: int | None = None  # the shard's bytes in the manifest: no member may claim more


@dataclass(frozen=True)
class ShardSet:
    """A shard set: ``manifest`` (what it holds) and ``root`` (the folder or prefix its shard URLs are under)."""

    manifest: Manifest
    root: str

    @classmethod
    def open(cls, url: str | Path) -> ShardSet:
        """Read a shard set. ``url``: its folder or prefix (local, ``s3://``, ...), or its ``manifest.json``."""
        url = str(url).rstrip("/")
        root, name = split_url(url) if url.endswith(".json") else (url, MANIFEST)
        store = open_store(root)
        if not store.exists(name):
            raise ShardError(
                f"no {name} under {root}: expected the output folder of `python -m data_prep build` "
                "(its manifest is written last, so a build that did not finish has none; re-run it to resume)"
            )
        try:
            data = json.loads(store.read_bytes(name))
        except json.JSONDecodeError as err:
            raise ShardError(f"{store.url_of(name)} is not valid JSON: {err}") from err
        return cls(Manifest.from_dict(data, source=store.url_of(name)), store.url)

    @cached_property
    def store(self) -> Store:
        return open_store(self.root)

    @property
    def name(self) -> str:
        """The set's short name (its folder's), for logs and curves."""
        return Path(self.root.rstrip("/")).name or self.root

    def __str__(self) -> str:
        return self.root

    def shards(self, split: str) -> list[ShardInfo]:
        """One split's shards in manifest order, their URLs full (local paths or ``s3://...``)."""
        shards = [
            ShardInfo(self.store.url_of(s["url"]), s["samples"], s["digests"], s["bytes"])
            for s in self.manifest.shards_of(split)
        ]
        if not shards:
            raise ShardError(
                f"the {split!r} split of {self.root} has no shards (splits: "
                + ", ".join(f"{k}={self.manifest.num_samples(k)} samples" for k in self.manifest.splits)
                + "); build with a larger --val-frac/--test-frac or more subjects"
            )
        return shards

    def urls(self, split: str) -> list[str]:
        return [s.url for s in self.shards(split)]

    def verify(self, progress: bool = True) -> list[str]:
        """Recompute every shard's sha256; returns the problems found (empty when all match)."""
        problems = []
        for shard in bar(self.manifest.shards, desc="verify", unit="shard", enabled=progress):
            if not self.store.exists(shard["url"]):
                problems.append(f"{shard['url']}: missing")
                continue
            with self.store.open(shard["url"]) as f:
                sha, size = sha256_stream(f)
            if sha != shard["sha256"] or size != shard["bytes"]:
                problems.append(
                    f"{shard['url']}: sha256/size {sha[:12]}/{size} != manifest {shard['sha256'][:12]}/{shard['bytes']}"
                )
        return problems


class WithShards:
    """A value that carries a shard set as ``shards`` (an analysis's context, a run's member), with its manifest and
    root as its own attributes."""

    shards: ShardSet

    @property
    def manifest(self) -> Manifest:
        return self.shards.manifest

    @property
    def root(self) -> str:
        return self.shards.root
