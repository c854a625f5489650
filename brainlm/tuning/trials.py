"""What a sweep prints and tracks while it runs: ``MLflowTrials`` (a Ray Tune callback in the driver: a child run
per trial, one line per trial event, a status line every 30 s) and the value formatting it shares with the
reports."""

from __future__ import annotations

import datetime
import logging
import math
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ray import tune
from ray.tune.result import AUTO_RESULT_KEYS

logger = logging.getLogger(__name__)

STATUS_EVERY_S = 30.0
SKIP_METRICS = {*AUTO_RESULT_KEYS, "done", "trial_id", "experiment_tag", "should_checkpoint", "finished"}


def short_error(error: Any) -> str:
    """The last ``SomeError: message`` line of a trial's traceback."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    named = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b.*:", ln)]
    text = (named or lines or [type(error).__name__])[-1]
    return re.sub(r"^(?:[a-z_]\w*\.)+(?=[A-Z])", "", text)[:400]  # brainlm.x.NonFiniteLossError -> NonFinite...


@dataclass
class Headline:
    """What a sweep optimises and how a trial's outcome is printed."""

    metric: str
    mode: str  # min | max
    step_key: str  # the reported field that counts progress (epoch, step)
    show: tuple[str, ...] = ()  # further final metrics shown


class MLflowTrials(tune.Callback):
    """Runs in the driver: a child run per trial (params; metrics at every reported step; the trial's files
    from its checkpoint, except a saved model; the outcome as tags) and one line per finished trial."""

    def __init__(self, runs: Any, headline: Headline, fixed: dict[str, Any] | None = None) -> None:
        self.runs, self.headline, self.fixed = runs, headline, fixed or {}
        self._last_step: dict[str, int] = {}
        self._seen: dict[str, set[str]] = {}
        self._off = False
        self._started, self._shown = time.time(), 0.0

    def __getstate__(self) -> dict[str, Any]:  # pickled into the experiment for --resume
        return {"runs": self.runs, "headline": self.headline, "fixed": self.fixed}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _last_step={}, _seen={}, _off=False, _started=time.time(), _shown=0.0)

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        if time.time() - self._shown >= STATUS_EVERY_S:
            self._status(trials)

    def on_experiment_end(self, trials: list, **info) -> None:
        self._status(trials)

    def _status(self, trials: list) -> None:
        """One line: trial counts by state, the best so far, the time taken."""
        self._shown = time.time()
        states = {"running": 0, "pending": 0, "finished": 0, "stopped": 0, "errored": 0}
        for t in trials:
            if t.status == "TERMINATED":
                states["finished" if (t.last_result or {}).get("finished") else "stopped"] += 1
            else:
                key = {"ERROR": "errored", "RUNNING": "running"}.get(t.status, "pending")
                states[key] += 1
        h = self.headline
        scored = [
            t for t in trials if number((t.last_result or {}).get(h.metric)) and math.isfinite(t.last_result[h.metric])
        ]
        best = ""
        if scored:
            top = (min if h.mode == "min" else max)(scored, key=lambda t: t.last_result[h.metric])
            best = f" | best {h.metric} {fmt(top.last_result[h.metric])} ({top.trial_id})"
        counts = ", ".join(f"{n} {state}" for state, n in states.items() if n)
        elapsed = datetime.timedelta(seconds=round(time.time() - self._started))
        logger.info(f"[sweep] {len(trials)} trials: {counts}{best} | {elapsed}")

    def _safe(self, what: str, fn, *args) -> None:
        if self._off:
            return
        try:
            fn(*args)
        except Exception as err:  # tracking never stops a sweep
            self._off = True
            logger.warning(
                f"MLflow {what} failed ({type(err).__name__}: {err}); the sweep goes on without per-trial tracking"
            )

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        logger.info(f"[trial {trial.trial_id}] started: {fmt_config(trial.config)}")
        self._safe("child run", lambda: self.runs.child(trial.trial_id, self._params(trial)))

    def _params(self, trial) -> dict[str, Any]:
        return {**self.fixed, **trial.config}

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        def log() -> None:
            step = int(result.get(self.headline.step_key, self._last_step.get(trial.trial_id, 0)))
            self._last_step[trial.trial_id] = step
            metrics = {k: v for k, v in result.items() if k not in SKIP_METRICS and number(v)}
            seen = self._seen.setdefault(trial.trial_id, set())
            if result.get("finished"):  # the trial's outcome: names also reported per step get a final_ prefix
                metrics = {f"final_{k}" if k in seen else k: v for k, v in metrics.items()}
            else:
                seen.update(metrics)
            self.runs.log_metrics(self.runs.child(trial.trial_id, self._params(trial)), metrics, step)

        self._safe("log_metrics", log)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        last = trial.last_result or {}
        h = self.headline
        if last.get("finished"):
            outcome = "finished"
            extra = "".join(f", {k} {fmt(last[k])}" for k in h.show if k in last)
            line = f"{h.metric} {fmt(last.get(h.metric))}{extra}"
        else:
            outcome = "stopped"
            line = f"stopped by ASHA at {h.step_key} {last.get(h.step_key)} ({h.metric} {fmt(last.get(h.metric))})"
        logger.info(f"[trial {trial.trial_id}] {outcome}: {line}")

        def log() -> None:
            run_id = self.runs.child(trial.trial_id, self._params(trial))
            self.runs.set_tags(run_id, {"brainlm.outcome": outcome})
            if trial.checkpoint is not None:
                with tempfile.TemporaryDirectory() as tmp:
                    folder = Path(trial.checkpoint.to_directory(tmp))
                    for p in sorted(folder.iterdir()):
                        if p.is_file():  # a saved model (a folder) goes to the registry, not to every child
                            self.runs.log_artifact(run_id, p, "trial")
            self.runs.end(run_id, "FINISHED")

        self._safe("end child run", log)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        local = Path(trial.error_file) if trial.error_file else None  # written before this call; storage later
        error = short_error(local.read_text() if local and local.exists() else trial.get_error() or "unknown error")
        logger.warning(f"[trial {trial.trial_id}] failed: {error}")

        def log() -> None:
            run_id = self.runs.child(trial.trial_id, self._params(trial))
            self.runs.set_tags(run_id, {"brainlm.outcome": "error", "brainlm.error": error})
            self.runs.end(run_id, "FAILED")

        self._safe("end child run", log)


def number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def show(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Rows with numbers to 4 significant digits, for the printed table."""
    return [{k: fmt(v) for k, v in r.items()} for r in rows]


def fmt_config(config: dict[str, Any]) -> str:
    return " ".join(f"{k}={fmt(v)}" for k, v in sorted(config.items()))
