"""Atomic file writes: a reader sees a whole file or none. The one writer every saved file goes through (model
folders, shards and manifests in a local store, checkpoint markers).

Each file is written under a dot-prefixed temporary name in its own folder (never matched by ``*.tar`` or
``*.json``, and a rename within one file system is atomic on POSIX), flushed to disk, then renamed into place.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

Writer = Callable[[str], None]  # writes the content to the temporary path it is given


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temporary(path: Path) -> Path:
    """A fresh temporary name beside ``path`` (``.NAME.XXXX.tmp``), its folder created, with the permissions a plain
    ``open()`` would give (mkstemp makes 0600, which pods running under another uid could not read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    return Path(tmp)


def write_all(files: list[tuple[Path, Writer]]) -> None:
    """Write every file to a temporary name, fsync each, then rename them in the order given (so the last one can
    mark the set complete). Nothing is left behind when a writer fails."""
    tmps: list[tuple[Path, Path]] = []
    try:
        for path, write in files:
            tmp = temporary(path)
            tmps.append((tmp, path))
            write(str(tmp))
            os.chmod(tmp, 0o666 & ~_umask())  # a writer that recreates the file (safetensors does: 0600) gets it too
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        for tmp, path in tmps:
            os.replace(tmp, path)
    finally:
        for tmp, _ in tmps:
            tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> None:
    """``path`` holds ``data`` afterwards, or its old content if the write fails."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    write_all([(Path(path), write)])


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())
