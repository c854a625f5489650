"""Benchmark thread counts on a shared machine: training and an analysis, quiet and beside one competing process,
with brainlm's own choice (``brainlm.threads``: the free cores) against a fixed count of every core.

Each configuration runs the same command on the same shard set; the competing process is a busy loop pinned to
nothing (the scheduler shares the cores), started before the command and stopped after it. Figures are side by side
in one run, so a disturbed machine shows in every row alike.

    python -m benchmarks.bench_threads --work /tmp/bench-threads --out bench-results/threads.json
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, command_line, machine, now_utc, write_json


def busy_loop() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="scratch folder (cohort, shards, runs)")
    p.add_argument("--steps", type=int, default=200, help="training steps per run")
    p.add_argument("--out")
    a = p.parse_args()
    work = Path(a.work)
    py = sys.executable
    if not (work / "shards" / "manifest.json").exists():
        subprocess.run([py, "-m", "data_prep", "synth", "--out", str(work / "cohort"), "--subjects", "12"], check=True)
        subprocess.run([py, "-m", "data_prep", "build", "--inputs", str(work / "cohort"), "--out",
                        str(work / "shards"), "--quiet"], check=True)  # fmt: skip
    cores = str(os.cpu_count() or 1)
    train = [py, "launcher/pretrain.py", "--config", "configs/pretrain/debug.yaml", "--data.shards",
             str(work / "shards"), "--train.max_steps", str(a.steps), "--train.val_every", "0", "--train.ckpt_every",
             "0", "--data.num_workers", "0", "--tracking.enabled", "false", "--train.resume", "null"]  # fmt: skip
    model = work / "model"
    if not (model / "config.json").exists():
        timed([*train, "--train.out_dir", str(work / "seed-run")], {})
        (work / "seed-run" / "model").rename(model)
    reconstruct = [py, "-m", "brainlm.cli", "reconstruct", "--model", str(model), "--shards", str(work / "shards"),
                   "--masking", "random", "--device", "cpu", "--context", "0"]  # fmt: skip
    rows: list[dict[str, Any]] = []
    for load in ("quiet", "one busy process"):
        for threads, env in (("brainlm's choice", {}), (f"{cores} (every core)", {"BRAINLM_THREADS": cores})):
            row: dict[str, Any] = {"load": load, "threads": threads}
            for name, cmd in (
                ("train_s", [*train, "--train.out_dir", str(work / f"run-{len(rows)}")]),
                ("reconstruct_s", [*reconstruct, "--out", str(work / f"eval-{len(rows)}")]),
            ):
                competitor = busy_loop() if load != "quiet" else None
                time.sleep(65 if competitor else 0)  # the 1-minute load average sees it, as it would a real job
                try:
                    row[name] = round(timed(cmd, env), 1)
                finally:
                    if competitor:
                        competitor.kill()
                        competitor.wait()
                time.sleep(5)
            rows.append(row)
            print(row, flush=True)
    write_json(
        Path(a.out) if a.out else None,
        {"command": command_line(), "date": now_utc(), "machine": machine(), "steps": a.steps, "rows": rows},
    )


if __name__ == "__main__":
    main()
