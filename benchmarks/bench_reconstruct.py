"""Benchmark `brainlm reconstruct` as a whole command against an earlier commit's, side by side in one run.

The two runs alternate (before, after, before, after, ...) on the same model, shards and threads, each a fresh
process timed from start to exit; the ratio is taken pair by pair, so a machine whose speed drifts moves both sides.
The earlier commit is checked out into a temporary git worktree and run with this checkout's Python environment.
Every figure of the two metrics.json files (pooled and per-parcel R^2, every window's sums, the intervals) is
compared: the largest absolute difference is reported, and the chosen baseline settings must be the same.

    python -m benchmarks.bench_reconstruct --before 36f642b --model demo/runs/debug/model --shards demo/shards \
        --out bench-results/reconstruct.json [--pairs 2] [--threads 2]

`make demo` makes the model and the shards (300 parcels, 24 validation and 24 test windows).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import CpuMonitor, command_line, machine, now_utc, write_json

REPO = Path(__file__).resolve().parents[1]


def figures(a: Any, b: Any, path: str = "") -> tuple[float, list[str]]:
    """The largest absolute difference between the numbers of two metrics trees, and the paths where anything else
    differs (the model's path is expected to)."""
    if isinstance(a, dict) and isinstance(b, dict):
        worst, other = 0.0, sorted(f"{path}/{k}" for k in set(a) ^ set(b))
        for k in set(a) & set(b):
            w, o = figures(a[k], b[k], f"{path}/{k}")
            worst, other = max(worst, w), other + o
        return worst, other
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        worst, other = 0.0, []
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            w, o = figures(u, v, f"{path}[{i}]")
            worst, other = max(worst, w), other + o
        return worst, other
    if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool):
        return abs(float(a) - float(b)), []
    return 0.0, [] if a == b or path.endswith("/model") else [path]


def run(tree: Path, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "brainlm.cli", "--threads", str(args.threads), "reconstruct", "--model", args.model]
    cmd += ["--shards", args.shards, "--out", str(out), "--masking", "random,parcel"]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    with CpuMonitor() as mon:
        done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed in {tree}:\n{done.stderr[-3000:]}")
    return {**mon.record(), "wall_s": round(mon.wall, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the git commit to compare with")
    parser.add_argument("--model", required=True)
    parser.add_argument("--shards", required=True)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    args.model, args.shards = str(Path(args.model).resolve()), str(Path(args.shards).resolve())
    work = Path(tempfile.mkdtemp(prefix="bench-reconstruct-"))
    before = work / "before"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(before), args.before], check=True)
    try:
        rows = []
        for i in range(args.pairs):
            row = {side: run(tree, args, work / f"{side}{i}") for side, tree in (("before", before), ("after", REPO))}
            row["speedup"] = round(row["before"]["wall_s"] / row["after"]["wall_s"], 2)
            rows.append(row)
            print(
                f"pair {i}: before {row['before']['wall_s']:.1f} s, after {row['after']['wall_s']:.1f} s, "
                f"x{row['speedup']:.2f}, foreign CPU {row['after']['foreign_cpu_share']:.0%}",
                flush=True,
            )
        old, new = (json.loads((work / f"{side}0" / "metrics.json").read_text()) for side in ("before", "after"))
        worst, other = figures(old, new)
        same_settings = old["baseline_settings"] == new["baseline_settings"]
        print(f"largest difference of any figure: {worst:.1e}; settings the same: {same_settings}; other: {other}")
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(before)], check=False)
    speedups = sorted(r["speedup"] for r in rows)
    write_json(
        Path(args.out) if args.out else None,
        {
            "command": command_line(),
            "date": now_utc(),
            "machine": machine(),
            "before": args.before,
            "after": subprocess.run(
                ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
            ).stdout.strip(),
            "pairs": rows,
            "median_speedup": round((speedups[(len(speedups) - 1) // 2] + speedups[len(speedups) // 2]) / 2, 2),
            "max_abs_difference": worst,
            "settings_equal": same_settings,
            "other_differences": other,
        },
    )


if __name__ == "__main__":
    main()
