"""One writer per folder: a lock file naming its holder, taken before a job writes into a folder and removed when it
ends. A second job into the same folder is refused with the holder named; a lock left by a job that died on this
host (its pid gone) is stale and taken over; one from another host cannot be checked from here and is said so.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from brainlm.exceptions import BrainLMError

NAME = ".brainlm.lock"


class FolderBusyError(BrainLMError):
    """Another job holds the folder's lock."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


class FolderLock:
    """``with FolderLock(folder, "training"):`` holds ``folder/.brainlm.lock`` for the block."""

    def __init__(self, folder: str | Path, what: str) -> None:
        self.path = Path(folder) / NAME
        self.what = what
        self.held = False

    def acquire(self) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "what": self.what, "since": time.time()}
        me["command"] = " ".join(sys.argv)[:500]
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._stale():
                    continue
                self.path.unlink(missing_ok=True)  # a holder that died on this host: take the folder over
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise self._busy()

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _stale(self) -> bool:
        holder = self._holder()
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            if not _alive(holder["pid"]):
                return True
            raise self._busy(holder)
        if not holder and self.path.exists() and time.time() - self.path.stat().st_mtime > 60:
            return True  # an empty or torn lock file older than a minute: its writer died while writing it
        raise self._busy(holder)

    def _busy(self, holder: dict | None = None) -> FolderBusyError:
        holder = holder if holder is not None else self._holder()
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
        where = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {since}"
        hint = (
            "wait for it, or give another folder"
            if holder.get("host") == socket.gethostname()
            else "wait for it, or give another folder; if that job is gone (another host cannot be checked from "
            f"here), delete {self.path}"
        )
        return FolderBusyError(
            f"{self.path.parent} is in use by {holder.get('what', 'another job')} ({where}: "
            f"{holder.get('command', '?')}); one job writes into a folder at a time: {hint}"
        )

    def release(self) -> None:
        if self.held and self._holder().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
