"""Reading the cohort's text tables (recordings.tsv, participants.tsv, splits, atlas tables): what cannot be read
is said with the file, what was expected and how to fix it, never as a parser's traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from brainlm.exceptions import InputError


def read_tsv(path: str | Path, what: str, **options: Any) -> pd.DataFrame:
    """``pd.read_csv(path, **options)`` (tab-separated unless ``sep`` is given), with ``what`` naming the table in
    the error when the file is not UTF-8 text or not a table."""
    options.setdefault("sep", "\t")
    try:
        return pd.read_csv(path, encoding="utf-8", **options)
    except UnicodeDecodeError as err:
        raise InputError(
            f"{what} {path}: not UTF-8 text (a byte 0x{err.object[err.start]:02x}); save it as "
            "UTF-8 (e.g. `iconv -f latin1 -t utf-8 FILE > FILE.utf8`) and re-run"
        ) from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        sep = "tab" if options["sep"] == "\t" else repr(options["sep"])
        raise InputError(f"{what} {path}: not a {sep}-separated table with a header row ({err})") from None


def utf8_name(path: Path) -> bool:
    """Whether a file name can be written into a manifest (os.fsdecode leaves undecodable bytes as surrogates)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
