"""Benchmark the object-store layer before and after a change, side by side: one S3 server, two checkouts.

Each round runs, for every checkout in turn (alternating, so a noisy machine hits both alike), a child process
with that checkout first on ``sys.path`` which, against the same SeaweedFS ``weed mini`` on loopback ports:
1. builds the arrays cohort into ``s3://bench/<tag>-<round>`` (``data_prep.build.build``, one worker: parcellated
   intermediates and shards written through the store);
2. verifies every shard's sha256 by streaming it back (``data_prep inspect --verify``'s check);
3. streams the training split through ``TrainLoader`` (0 workers, micro batch 32, window 200) for at least
   ``--read-seconds`` after the first batch: crops/s.
It reports each stage's seconds (crops/s for the read) per checkout and the ratio of the medians.

    python -m benchmarks.bench_store --before /tmp/brainlm-before --out bench-results/store.json
    # /tmp/brainlm-before: git worktree add /tmp/brainlm-before <commit>
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.bench_data_prep import synth
from benchmarks.common import ROOT, command_line, create_bucket, machine, now_utc, seaweedfs, write_json

# Runs inside the child, on either checkout: the shard-set API changed (ShardSet), so it takes what is there.
CHILD = r"""
import json, sys, time
from data_prep.build import BuildConfig, build
from brainlm.data.loader import TrainLoader
inputs, url, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
t = time.perf_counter()
build(BuildConfig(inputs=inputs, out=url, workers=1, shard_mb=16.0, progress=False))
out = {"build_s": time.perf_counter() - t}
try:
    from brainlm.data.shardset import ShardSet
    shard_set = ShardSet.open(url)
    verify, loader = shard_set.verify, (lambda: TrainLoader(shard_set, "train", 32, 200, seed=0))
except ImportError:  # before ShardSet: the manifest and its root as two values
    from brainlm.data.format import load_manifest
    from data_prep.inspect import verify as verify_pair
    manifest, root = load_manifest(url)
    verify, loader = (lambda progress: verify_pair(manifest, root, progress)), (
        lambda: TrainLoader(manifest, root, "train", 32, 200, seed=0))
t = time.perf_counter()
assert verify(progress=False) == []
out["verify_s"] = time.perf_counter() - t
it = loader()
next(it)
t, n = time.perf_counter(), 0
while time.perf_counter() - t < seconds or n < 10:
    next(it)
    n += 1
out["read_crops_per_s"] = n * 32 / (time.perf_counter() - t)
print(json.dumps(out))
"""


def run_child(checkout: Path, inputs: Path, url: str, seconds: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(inputs), url, str(seconds)],
        cwd=checkout, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode:
        raise RuntimeError(f"{checkout}: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="the checkout to compare against (a worktree)")
    parser.add_argument("--after", type=Path, default=ROOT, help="default: this checkout")
    parser.add_argument("--subjects", type=int, default=40, help="array cohort: subjects (2 recordings each)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--read-seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    sides = {"before": args.before.resolve(), "after": args.after.resolve()}
    results: dict[str, list[dict]] = {k: [] for k in sides}
    with tempfile.TemporaryDirectory() as tmp, seaweedfs(Path(tmp) / "weed"):
        inputs = Path(tmp) / "arrays"
        synth(inputs, args.subjects)
        bucket = create_bucket("bench-store")
        for r in range(args.rounds):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for tag in order:
                got = run_child(sides[tag], inputs, f"{bucket}/{tag}-{r}", args.read_seconds)
                results[tag].append(got)
                print(f"round {r} {tag}: " + ", ".join(f"{k} {v:.2f}" for k, v in got.items()), flush=True)
    summary = {}
    for key in results["after"][0]:
        before = statistics.median(x[key] for x in results["before"])
        after = statistics.median(x[key] for x in results["after"])
        summary[key] = {"before": before, "after": after, "after/before": after / before}
        print(f"{key:18s} before {before:8.2f}  after {after:8.2f}  after/before {after / before:.2f}")
    write_json(args.out, {"date": now_utc(), "command": command_line(), "machine": machine(), "sides":
                          {k: str(v) for k, v in sides.items()}, "rounds": results, "summary": summary})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
