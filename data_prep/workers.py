"""The build's process pool and progress bars, shared by its stages."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor

from tqdm import tqdm

from brainlm import progress


class Workers:
    """``map`` in this process (one worker) or in a process pool started on first use and shared by every stage of
    the build (each worker imports the stack once: about a second, several with nilearn)."""

    def __init__(self, n: int) -> None:
        self.n, self.pool = n, None

    def map(self, fn, jobs):
        if self.n == 1:
            return map(fn, jobs)
        if self.pool is None:
            # spawn: workers must not inherit boto3 clients, threads or locks from the parent.
            self.pool = ProcessPoolExecutor(
                max_workers=self.n,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=die_with_parent,
                initargs=(os.getpid(),),
            )
        return self.pool.map(fn, jobs, chunksize=1)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def die_with_parent(parent: int) -> None:
    """A pool worker ends when the build that started it does, even by SIGKILL (Linux: PR_SET_PDEATHSIG), instead
    of parcellating on as an orphan."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the build died before the line above: nothing to work for
        os._exit(1)


def progress_bar(total: int, desc: str, unit: str, enabled: bool, **kw) -> tqdm:
    return progress.bar(total=total, desc=desc, unit=unit, enabled=enabled, **kw)
