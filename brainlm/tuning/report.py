"""A sweep's report: the table as Markdown / TSV / JSON through pandas, the trials figure, the parent run's metrics
and artifacts, and the printed table and notes (``finish_sweep``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from brainlm.eval.common import jsonable
from brainlm.exceptions import BrainLMError
from brainlm.tuning.options import SweepOptions
from brainlm.tuning.template import SweepOutcome, TrialRow, count_outcomes, out_dir
from brainlm.tuning.trials import fmt, fmt_config, number

log = logging.getLogger(__name__)


def frame(rows: list[dict[str, Any]], columns: list[str]) -> pd.DataFrame:
    """The report's table: one row per trial (or point), numbers to 4 significant digits."""
    return pd.DataFrame([{c: fmt(r.get(c, "")) for c in columns} for r in rows], columns=columns)


def write_summary(
    out: Path,
    stem: str,
    title: str,
    rows: list[dict[str, Any]],
    columns: list[str],
    summary: dict[str, Any],
    notes: list[str],
) -> list[Path]:
    """``stem``.md (title, table, notes), ``stem``.tsv and ``stem``.json."""
    table_df = frame(rows, columns)
    md = out / f"{stem}.md"
    md.write_text(f"# {title}\n\n{table_df.to_markdown(index=False)}\n\n" + "".join(f"{n}\n\n" for n in notes))
    table_df.to_csv(out / f"{stem}.tsv", sep="\t", index=False)
    (out / f"{stem}.json").write_text(json.dumps({**summary, "rows": rows}, indent=1, default=jsonable))
    return [md, out / f"{stem}.tsv", out / f"{stem}.json"]


def trials_figure(rows: list[TrialRow], x: str, y: str, path: Path, title: str, best: TrialRow | None) -> Path:
    """``y`` against ``x`` for every trial from its reported history (dashed: stopped early by ASHA)."""
    from brainlm import plots

    histories = {r.trial_id: [(h[x], h[y]) for h in r.history if number(h.get(x)) and number(h.get(y))] for r in rows}
    outcomes = {r.trial_id: r.outcome for r in rows}
    return plots.trials_figure(histories, outcomes, path, x, y, title, best.trial_id if best else None)


def trial_table(rows: list[TrialRow], params: list[str], metrics: list[str]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        row = {"trial": r.trial_id, "outcome": r.outcome, **{p: r.config.get(p, "") for p in params}}
        for m in metrics:
            row[m] = r.metrics.get(m, "") if r.outcome != "error" else ""
        out.append(row)
    return out


def error_notes(rows: list[TrialRow]) -> list[str]:
    return [f"errored trial {r.trial_id} ({fmt_config(r.config)}): {r.error}" for r in rows if r.outcome == "error"]


def finish_parent(
    runs: Any, parent: str, rows: list[TrialRow], files: list[Path], metrics: dict[str, float], tags: dict[str, Any]
) -> None:
    counts = count_outcomes(rows)
    try:
        runs.log_metrics(parent, {**{f"trials_{k}": v for k, v in counts.items()}, **metrics}, 0)
        runs.set_tags(parent, tags)
        for p in files:
            runs.log_artifact(parent, p, "summary")
        runs.end(parent, "FINISHED" if counts["finished"] else "FAILED")
    except Exception as err:  # the results are on disk either way
        log.warning(
            f"MLflow could not record the sweep's summary ({type(err).__name__}: {err}); it is in {files[0].parent}"
        )


def finish_sweep(
    outcome: SweepOutcome,
    opts: SweepOptions,
    *,
    stem: str,
    title: str,
    table_rows: list[dict[str, Any]],
    columns: list[str],
    summary: dict[str, Any],
    notes: list[str],
    figures: list[Path],
    parent_metrics: dict[str, float],
    parent_tags: dict[str, Any],
    failed: str | None,
) -> list[Path]:
    """Write the report (``stem``.md / .tsv / .json beside ``figures``), record it in the parent run, print the table
    and the notes; ``failed`` (a message) raises after the report is written."""
    out = out_dir(opts)
    files = [*write_summary(out, stem, title, table_rows, columns, summary, notes), *figures]
    finish_parent(outcome.runs, outcome.parent, outcome.rows, files, parent_metrics, parent_tags)
    log.info("\n" + frame(table_rows, columns).to_string(index=False))
    log.info(title)
    for note in notes:
        log.info(note)
    log.info(
        f"summary: {files[0]} (and .tsv, .json); MLflow parent run {outcome.parent} in experiment {opts.experiment}"
    )
    if failed:
        raise BrainLMError(failed)
    return files
