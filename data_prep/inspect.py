"""``data_prep inspect``: what a shard set holds, as text."""

from __future__ import annotations

from collections import Counter

from brainlm.data.format import Manifest
from brainlm.data.shardset import ShardSet


def summary(shard_set: ShardSet) -> str:
    """What a shard set holds: its atlas, crops, scaling, splits and skipped recordings (the verification is
    ``ShardSet.verify``)."""
    manifest = shard_set.manifest
    lines = [
        f"shards under {shard_set.root}",
        f"  atlas        {manifest.atlas.name}: {manifest.atlas.num_parcels} parcels"
        + (f", {len(set(manifest.atlas.networks))} networks" if manifest.atlas.networks else ""),
        f"  crops        {manifest.crop} timepoints (stride {manifest.stride}) at TR {manifest.tr:g} s, "
        f"{manifest.dtype}",
        "  orientation  " + ", ".join(f"{k}: {v}" for k, v in sorted(manifest.orientation.items())),
        f"  scaling      (x - median) / IQR per parcel, fitted on {manifest.scaling.get('n_recordings')} training "
        f"recordings ({manifest.scaling.get('n_timepoints')} timepoints)",
        f"  {'split':<6} {'subjects':>9} {'recordings':>11} {'crops':>8} {'shards':>7} {'MiB':>9}",
    ]
    for split, info in manifest.splits.items():
        shards = manifest.shards_of(split)
        lines.append(
            f"  {split:<6} {len(info['subjects']):>9} {info['recordings']:>11} {info['samples']:>8} "
            f"{len(shards):>7} {sum(s['bytes'] for s in shards) / 2**20:>9.1f}"
        )
    lines.append(f"  skipped      {len(manifest.skipped)} recording(s)")
    reasons = Counter(s["reason"].split(": ", 1)[-1].split(";")[0][:70] for s in manifest.skipped)
    lines += [f"    {n} x {reason}" for reason, n in reasons.most_common(8)]
    lines.append(f"  manifest     {shard_set.store.url_of('manifest.json')}")
    return "\n".join(lines)


def shard_lines(manifest: Manifest) -> list[str]:
    """One line per shard: its URL, samples, size and sha256 (what the README promises `inspect` prints)."""
    return [
        f"  {s['url']}  {s['samples']:>6} samples  {s['bytes']:>12} bytes  sha256 {s['sha256']}"
        for s in manifest.shards
    ]
