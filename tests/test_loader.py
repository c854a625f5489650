"""The training loader: slot streams are deterministic, seekable, and independent of ranks and workers."""

from __future__ import annotations

import itertools

import torch

from brainlm.data.loader import TrainLoader, fixed_samples
from brainlm.data.shardset import ShardSet


def batches(root, n, mb=4, rank=0, world=1, workers=0, start=0, window=40, seed=0):
    shard_set = ShardSet.open(str(root))
    loader = TrainLoader(shard_set, "train", mb, window, seed, rank, world, workers, 2, start=start)
    return [next(loader) for _ in range(n)]


def test_global_batch_is_independent_of_world_size_and_workers(tiny_shards):
    one = batches(tiny_shards, 12, mb=8)
    for workers in (0, 1, 2, 3):
        r0 = batches(tiny_shards, 12, mb=4, rank=0, world=2, workers=workers)
        r1 = batches(tiny_shards, 12, mb=4, rank=1, world=2, workers=workers)
        for a, b, c in zip(one, r0, r1, strict=True):
            assert torch.equal(a["signal"], torch.cat([b["signal"], c["signal"]]))
            assert torch.equal(a["seed"], torch.cat([b["seed"], c["seed"]]))


def test_resume_seeks_to_the_same_next_batches(tiny_shards):
    full = batches(tiny_shards, 30, mb=4, workers=2)  # 30 x 4 = 120 samples: past one pass over 96 crops
    for start in (1, 9, 25):
        resumed = batches(tiny_shards, 30 - start, mb=4, workers=1, start=start)
        for a, b in zip(full[start:], resumed, strict=True):
            assert torch.equal(a["signal"], b["signal"]) and torch.equal(a["seed"], b["seed"])


def test_streams_cover_every_crop_and_never_run_dry(tiny_shards):
    # 3 uneven shards, 2 ranks x 2 workers: each of the 8 slots streams for as long as asked.
    shard_set = ShardSet.open(str(tiny_shards))
    manifest = shard_set.manifest
    seen = set()
    for rank in (0, 1):
        loader = TrainLoader(shard_set, "train", 4, 40, 0, rank, 2, 2, 2)
        for batch in itertools.islice(loader, 40):
            assert batch["signal"].shape == (4, 7, 40) and torch.isfinite(batch["signal"]).all()
            seen.update(tuple(x.flatten()[:6].tolist()) for x in batch["signal"])
    assert len(seen) == manifest.num_samples("train")  # 320 draws reach all 96 crops
    # slots read different shards at the same time: the first samples of the 8 slots are not all alike
    first = batches(tiny_shards, 1, mb=8)[0]["signal"]
    assert len({tuple(x.flatten()[:6].tolist()) for x in first}) == 8


def test_sub_windows_are_random_in_training_and_fixed_for_evaluation(tiny_shards):
    shard_set = ShardSet.open(str(tiny_shards))
    b = batches(tiny_shards, 5, mb=8, window=20)
    assert b[0]["signal"].shape == (8, 7, 20)
    full, _ = fixed_samples(shard_set, "train", 96, 40)
    full_windows = {tuple(x[:, s : s + 20].flatten().tolist()) for x in full for s in range(21)}
    starts_seen = 0
    for batch in b:
        for x in batch["signal"]:
            assert tuple(x.flatten().tolist()) in full_windows  # a true sub-window of some crop
            starts_seen += 1
    a, _ = fixed_samples(shard_set, "val", 5, 20)
    c, _ = fixed_samples(shard_set, "val", 5, 20)
    assert torch.equal(a, c)
    different_seed = batches(tiny_shards, 5, mb=8, window=20, seed=1)
    assert not torch.equal(b[0]["signal"], different_seed[0]["signal"])
