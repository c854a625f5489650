"""The build's process pool and progress bars, shared by its stages."""

from __future__ import annotations

import multiprocessing
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
            self.pool = ProcessPoolExecutor(max_workers=self.n, mp_context=multiprocessing.get_context("spawn"))
        return self.pool.map(fn, jobs, chunksize=1)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def progress_bar(total: int, desc: str, unit: str, enabled: bool, **kw) -> tqdm:
    return progress.bar(total=total, desc=desc, unit=unit, enabled=enabled, **kw)
