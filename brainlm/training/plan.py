"""What a pretraining run is before any process group exists (``preflight``): the DeepSpeed JSON and the shard
sets, one or a mixture (``data.shards`` a list, ``data.weights``), checked against the recipe."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from brainlm.data.format import Manifest
from brainlm.data.shardset import ShardSet, WithShards
from brainlm.exceptions import ConfigError, ShardError
from brainlm.model import ModelConfig
from brainlm.training.ds_config import read_ds_config
from brainlm.training.recipe import PretrainConfig


@dataclass
class Member(WithShards):
    """One shard set of a run, with its sampling weight and its short name (for logs; unique within the run)."""

    shards: ShardSet
    weight: float = 1.0
    name: str = ""


@dataclass
class Plan:
    """What a run is, known before any process group exists. ``sets``: the shard sets it trains on (one, or a
    mixture); the first is the primary one (its atlas, TR and scaling are the export's defaults)."""

    sets: list[Member]
    model: ModelConfig  # the recipe's model with the primary atlas's parcel count
    ds_config: dict[str, Any]

    @property
    def manifest(self) -> Manifest:
        return self.sets[0].manifest

    @property
    def root(self) -> str:
        return self.sets[0].root

    @property
    def num_parcels(self) -> int:
        return self.model.num_parcels

    def by_atlas(self) -> list[list[Member]]:
        """The sets grouped by atlas, atlases in first-seen order (the primary's first): one decoder prior slot and
        one scaling entry of the export each."""
        groups: list[list[Member]] = []
        for s in self.sets:
            for group in groups:
                if group[0].manifest.atlas == s.manifest.atlas:
                    group.append(s)
                    break
            else:
                groups.append([s])
        return groups


def shard_list(value: str) -> list[str]:
    """``data.shards``: one shard set or several, comma-separated."""
    return [part.strip() for part in str(value).split(",") if part.strip()]


def mixture_weights(cfg: PretrainConfig, sets: list[Member]) -> list[float]:
    """``data.weights`` (one positive number per set), else each set's training crops."""
    if not str(cfg.data.weights).strip():
        return [float(s.manifest.num_samples(cfg.data.train_split)) for s in sets]
    try:
        weights = [float(w) for w in str(cfg.data.weights).split(",")]
    except ValueError:
        weights = []
    if len(weights) != len(sets) or not all(math.isfinite(w) and w > 0 for w in weights):
        raise ConfigError(
            f"`data.weights` {cfg.data.weights!r}: expected {len(sets)} positive numbers, comma-separated, one per "
            f"shard set of data.shards ({', '.join(s.root for s in sets)}); or leave it empty to weigh the sets by "
            "their training crops"
        )
    return weights


def check_mixture(cfg: PretrainConfig, sets: list[Member]) -> None:
    """Shard sets one model can train on together: one TR (a model is trained for one), every set with training
    crops, and the same parcel count where the model has a learned per-parcel table (it ties it to one atlas)."""
    primary = sets[0].manifest
    for s in sets:
        if not s.manifest.num_samples(cfg.data.train_split):
            raise ShardError(f"{s.root} has no {cfg.data.train_split!r} crops to train on")
        if abs(s.manifest.tr - primary.tr) > 1e-3 and not cfg.model.time_unit_s:
            raise ShardError(
                f"the shard sets have different TRs ({sets[0].root}: {primary.tr:g} s, {s.root}: {s.manifest.tr:g} "
                f"s); a model is trained at one TR: rebuild {s.root} at {primary.tr:g} s (python -m data_prep build "
                f"--tr {primary.tr:g} --resample), or make the model TR-aware (--model.time_unit_s {primary.tr:g})"
            )
        if cfg.model.learned_parcel_embedding and s.manifest.atlas.num_parcels != primary.atlas.num_parcels:
            raise ConfigError(
                f"model.learned_parcel_embedding ties the model to one atlas ({primary.atlas.num_parcels} parcels), "
                f"but {s.root} has {s.manifest.atlas.num_parcels}: turn it off to train on several atlases"
            )


def preflight(cfg: PretrainConfig, ds_config: dict | str | Path) -> Plan:
    """Read the DeepSpeed JSON and the shard sets' manifests and check they fit the recipe; raises before any work."""
    ds_json = read_ds_config(ds_config)
    urls = shard_list(cfg.data.shards)
    if not urls:
        raise ConfigError("`data.shards` is empty: name a shard set (a folder or s3://bucket/prefix)")
    sets = []
    for url in urls:
        shard_set = ShardSet.open(url)
        check_crops(cfg, shard_set)
        sets.append(Member(shard_set, name=shard_set.name))
    check_mixture(cfg, sets)
    names = [s.name for s in sets]
    for i, (s, w) in enumerate(zip(sets, mixture_weights(cfg, sets), strict=True)):
        s.weight = w
        s.name = s.name if names.count(s.name) == 1 else f"{s.name}{i}"  # names of logged curves: unique
    # The (primary) atlas decides the parcel count.
    model_cfg = dataclasses.replace(cfg.model, num_parcels=sets[0].manifest.atlas.num_parcels)
    return Plan(sets, model_cfg, ds_json)


def check_crops(cfg: PretrainConfig, shard_set: ShardSet) -> None:
    manifest, root = shard_set.manifest, shard_set.root
    window = cfg.model.num_timepoints
    if manifest.crop < window:
        raise ShardError(
            f"{root}: crops of {manifest.crop} timepoints are shorter than model.num_timepoints={window}; rebuild "
            f"with a larger --crop or lower model.num_timepoints (to {manifest.crop} or less, a multiple of "
            f"model.patch_size {cfg.model.patch_size})"
        )
    if cfg.model.prior_context and manifest.crop <= window:
        raise ShardError(
            f"{root}: model.prior_context reads each training window's recording context, the rest of its crop, but "
            f"these crops ({manifest.crop} timepoints) are no longer than the window ({window}): no window would have "
            "any; rebuild with a larger --crop (e.g. twice the window, or a whole recording) or set "
            "model.prior_context 0"
        )
