"""Domain errors. Each message says what was expected, what was received, and what to do."""

from __future__ import annotations

import sys
from collections.abc import Callable

from brainlm.logs import to_terminal


class BrainLMError(Exception):
    """Base class of every error brainlm raises on purpose."""


class ConfigError(BrainLMError, ValueError):
    """A recipe, preset or override is invalid; the message names the field."""


class InputError(BrainLMError, ValueError):
    """An input recording cannot be used (unreadable, wrong shape, non-finite, ...)."""


class DimensionError(InputError):
    """An array's shape does not match what the atlas or model expects."""


class AtlasMismatchError(InputError):
    """The atlas does not match the image (shape or affine) or the array (parcel count)."""


class TRMismatchError(InputError):
    """A recording's repetition time differs from the one the build asks for."""


class EmptyRecordingError(InputError):
    """A recording has too few timepoints for one crop, or a flat / non-finite parcel."""


class ShardError(BrainLMError):
    """A shard or manifest is missing, corrupt, or disagrees with its checksum."""


class StoreError(BrainLMError):
    """The object store (local folder or S3) could not be read or written."""


class CheckpointError(BrainLMError):
    """A checkpoint is missing, incomplete, or was written by a different model config."""


class SweepInterrupted(BrainLMError):
    """A sweep stopped before every trial ended (Ctrl+C); ``--resume`` continues it."""


class NonFiniteLossError(BrainLMError):
    """The loss became NaN or infinite (pretraining, fine-tuning, a perturbation)."""


# OSErrors a command line reports as one error line naming the path (a path that is not what was expected).
PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def exit_code(action: Callable[[], int | None]) -> int:
    """Run a command line's action; its exit code (0 for None). Every command (``brainlm ...``, its ``data``,
    ``pretrain`` and ``tune`` and their shims) ends through this: an error brainlm raised on purpose, or a path that is
    not what was expected, is said in one line on stderr, no traceback, and exits 2 (130 for an interrupted sweep,
    as Ctrl+C). The library's messages are shown on the terminal first (``brainlm.logs.to_terminal``)."""
    to_terminal()
    try:
        return action() or 0
    except BrainLMError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 130 if isinstance(err, SweepInterrupted) else 2
    except PATH_ERRORS as err:
        print(f"error: {err.strerror or err}: {err.filename}; check the path given", file=sys.stderr, flush=True)
        return 2
