"""What the library says goes through :mod:`logging`, under the ``brainlm`` and ``data_prep`` loggers; the commands
decide what reaches the terminal (``to_terminal``), a notebook or an application its own way.

Each module logs under its own name (``log = logging.getLogger(__name__)``): INFO for what a run did and found
(notes, progress lines, the tables an analysis prints), WARNING for what a user should act on. Unconfigured, as
Python leaves a library, warnings reach stderr and the rest is quiet; ``to_terminal()`` (every command calls it)
writes INFO to stdout as it is and warnings and errors to stderr after ``warning:`` / ``error:``, the streams the
commands always used. In a notebook: ``brainlm.logs.to_terminal()``, or ``logging.basicConfig(level="INFO")``.
"""

from __future__ import annotations

import logging
import sys

LOGGERS = ("brainlm", "data_prep")


class _Terminal(logging.Handler):
    """INFO and below to stdout as they are; WARNING and above to stderr after their level. The streams are looked
    up when a record is written, so a redirected ``sys.stdout`` (a test's capture, a notebook cell) is honoured."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            if record.levelno >= logging.WARNING:
                stream, text = sys.stderr, f"{record.levelname.lower()}: {text}"
            else:
                stream = sys.stdout
            stream.write(text + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


def to_terminal(level: int | str = logging.INFO) -> None:
    """Show the library's messages from ``level`` up on this process's terminal (idempotent: one handler each)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not any(isinstance(h, _Terminal) for h in logger.handlers):
            logger.addHandler(_Terminal())
