"""How many threads a process computes with, chosen on purpose.

On a CPU, threads beyond the cores that are free do not add speed: they wait at every barrier for a preempted
peer. On this project's 2-core machine with one other busy process, debug training ran 1.19x faster with 1 thread
than with 2, the analyses alike (docs/benchmarks.md, section 7). So: ranks x threads <= the cores this process may
run on, less the cores other processes keep busy (the 1-minute load average when the process starts). The load
average remembers the last minute: a command started right after another heavy one is given fewer threads than a
quiet machine allows (1.64x slower there in the same benchmark). ``--threads`` / ``BRAINLM_THREADS`` /
``OMP_NUM_THREADS`` (in that order) override the choice.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

ENV = "BRAINLM_THREADS"
T = TypeVar("T")
R = TypeVar("R")


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def choose(ranks_here: int = 1, given: int | None = None) -> tuple[int, str]:
    """(threads per process, why): ``given``, the environment, else the free cores shared by this machine's ranks."""
    if given:
        return int(given), "--threads"
    for var in (ENV, "OMP_NUM_THREADS"):
        if os.environ.get(var, "").strip():
            return max(1, int(os.environ[var])), var
    cores = usable_cores()
    busy = int(os.getloadavg()[0] + 0.5) if hasattr(os, "getloadavg") else 0
    free = cores - min(busy, cores - 1)
    return max(1, free // max(1, ranks_here)), f"{cores} core(s), {min(busy, cores - 1)} busy, {ranks_here} rank(s)"


def apply(ranks_here: int = 1, given: int | None = None) -> int:
    """Set torch's intra-op threads by ``choose``; returns the count."""
    import torch

    n, _ = choose(ranks_here, given)
    torch.set_num_threads(n)
    return n


def map_kernels(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``fn`` over ``items`` in as many threads as torch computes with, every BLAS / LAPACK / torch kernel in them
    single-threaded; results in order. For many small linear-algebra calls (the reconstruction baselines: one
    150 x 150 Cholesky gains nothing from a second thread), which parallelise well across calls: numpy and torch
    release the GIL inside them. Serial with one thread, one item, or without threadpoolctl (scikit-learn's)."""
    import torch

    n = min(torch.get_num_threads(), len(items))
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        n = 1
    if n <= 1:
        return [fn(item) for item in items]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1), ThreadPoolExecutor(n) as pool:
            return list(pool.map(fn, items))
    finally:
        torch.set_num_threads(before)
