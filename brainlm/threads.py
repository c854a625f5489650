"""How many threads a process computes with, chosen on purpose.

On a CPU, threads beyond the cores that are free do not add speed: they wait at every barrier for a preempted
peer. On this project's 2-core machine with one other busy process, debug training ran 1.19x faster with 1 thread
than with 2, the analyses alike (docs/benchmarks.md, section 7). So: ranks x threads <= the cores this process may
run on, less the cores other processes keep busy now: the busy share of those cores over a quarter of a second when
the process starts (Linux ``/proc/stat``, less this process's own use; elsewhere the 1-minute load average, which
remembers the last minute and so gave a command started right after another heavy one fewer threads than the quiet
machine allowed: 1.64x slower in the same benchmark). ``--threads`` / ``BRAINLM_THREADS`` / ``OMP_NUM_THREADS`` (in
that order) override the choice.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

ENV = "BRAINLM_THREADS"
T = TypeVar("T")
R = TypeVar("R")


def _cpus() -> set[int]:
    """The CPUs this process may run on."""
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def usable_cores() -> int:
    return len(_cpus())


SAMPLE_S = 0.25  # how long the machine's present load is sampled


def _cpu_times(cpus: set[int]) -> tuple[int, int] | None:
    """(busy, total) jiffies of ``cpus`` since boot from /proc/stat; None where it cannot be read."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    busy = total = 0
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            ticks = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
            total += sum(ticks)
            busy += sum(ticks) - ticks[3] - ticks[4]
    return (busy, total) if total else None


def busy_cores(sample_s: float = SAMPLE_S) -> float:
    """How many of this process's cores other processes keep busy now: their busy share over ``sample_s`` seconds
    (less this process's own CPU time), or the 1-minute load average where /proc/stat is not there."""
    cpus = _cpus()
    before, own = _cpu_times(cpus), time.process_time()
    if before is None:
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    start = time.perf_counter()
    time.sleep(sample_s)
    after, wall = _cpu_times(cpus), time.perf_counter() - start
    if after is None or after[1] <= before[1]:
        return 0.0
    share = (after[0] - before[0]) / (after[1] - before[1])
    return max(0.0, share * len(cpus) - (time.process_time() - own) / wall)


def choose(ranks_here: int = 1, given: int | None = None) -> tuple[int, str]:
    """(threads per process, why): ``given``, the environment, else the free cores shared by this machine's ranks."""
    if given:
        return int(given), "--threads"
    for var in (ENV, "OMP_NUM_THREADS"):
        if os.environ.get(var, "").strip():
            return max(1, int(os.environ[var])), var
    cores = usable_cores()
    if cores <= max(1, ranks_here):  # one thread each whatever the load: nothing to sample
        return 1, f"{cores} core(s), {ranks_here} rank(s)"
    busy = int(busy_cores() + 0.5)
    free = cores - min(busy, cores - 1)
    return max(1, free // max(1, ranks_here)), f"{cores} core(s), {min(busy, cores - 1)} busy, {ranks_here} rank(s)"


def apply(ranks_here: int = 1, given: int | None = None) -> int:
    """Set torch's intra-op threads by ``choose``; returns the count."""
    import torch

    n, _ = choose(ranks_here, given)
    torch.set_num_threads(n)
    return n


def kernel_workers() -> int:
    """The threads ``map_kernels`` runs its items in: torch's thread count, 1 without threadpoolctl."""
    import torch

    return torch.get_num_threads() if importlib.util.find_spec("threadpoolctl") else 1


def map_kernels(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``fn`` over ``items`` in as many threads as torch computes with, every BLAS / LAPACK / torch kernel in them
    single-threaded; results in order. For many small linear-algebra calls (the reconstruction baselines: one
    150 x 150 Cholesky gains nothing from a second thread), which parallelise well across calls: numpy and torch
    release the GIL inside them. Serial with one thread, one item, or without threadpoolctl (scikit-learn's)."""
    import torch

    n = min(kernel_workers(), len(items))
    if n <= 1:
        return [fn(item) for item in items]
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1), ThreadPoolExecutor(n) as pool:
            return list(pool.map(fn, items))
    finally:
        torch.set_num_threads(before)
