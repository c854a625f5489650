"""What every sweep shares: the Ray session, the Tuner with ASHA, MLflow parent/child runs from the driver, the
trial table, summaries and figures."""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray import tune
from ray.tune.result import AUTO_RESULT_KEYS
from ray.tune.schedulers import ASHAScheduler

from brainlm.exceptions import ConfigError, SweepInterrupted

# -- the Ray session, the Tuner and MLflow ------------------------------------------------------------------


@dataclass
class SweepOptions:
    """How a sweep runs, whatever it sweeps."""

    samples: int = 8
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    address: str | None = None
    num_cpus: int | None = None
    storage: str = "runs/ray"
    name: str | None = None
    resume: bool = False
    retry_errored: bool = False
    experiment: str = "brainlm-sweeps"
    out: str | None = None
    grace_period: int | None = None
    reduction_factor: int = 3

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ConfigError(f"--samples must be at least 1, got {self.samples}")
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0:
            raise ConfigError(
                f"--cpus-per-trial must be > 0 and --gpus-per-trial >= 0, got {self.cpus_per_trial} "
                f"and {self.gpus_per_trial}"
            )
        if self.reduction_factor < 2:
            raise ConfigError(f"--reduction-factor must be at least 2, got {self.reduction_factor}")
        if self.resume and not self.name:
            raise ConfigError(
                f"--resume needs --name NAME: the sweep to continue (its folder under --storage {self.storage})"
            )
        if self.address and "://" not in self.storage:
            print(
                f"warning: --storage {self.storage} is a local path but the sweep runs on a cluster "
                f"({self.address}); use shared storage (s3://...) so every node can write its results",
                file=sys.stderr,
                flush=True,
            )


def _storage(opts: SweepOptions) -> str:
    return opts.storage if "://" in opts.storage else str(Path(opts.storage).resolve())


def _storage_filesystem(storage: str):
    """pyarrow's S3 filesystem with boto3's endpoint variable, for S3-compatible servers (None: Ray's choice)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not storage.startswith("s3://") or not endpoint:
        return None
    from pyarrow import fs

    return fs.S3FileSystem(endpoint_override=endpoint, region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))


def _s3_compatible_checksums(storage: str) -> None:
    """S3-compatible servers (an endpoint other than AWS's) may refuse the checksums newer AWS SDKs add to every
    upload (SeaweedFS answers UploadPart with INVALID_ACCESS_KEY_ID): ask for them only where required. Set before
    Ray starts, so a local Ray's workers inherit it; on a cluster put it in the pods' environment."""
    if storage.startswith("s3://") and (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")):
        os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
        os.environ.setdefault("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")


@contextmanager
def ray_session(opts: SweepOptions) -> Iterator[None]:
    """Join a cluster (``--address``) or start a local Ray bound to loopback with the CPUs it is given."""
    _s3_compatible_checksums(opts.storage)
    started = False
    address = opts.address or os.environ.get("RAY_ADDRESS")  # Ray's own variable, e.g. inside `ray job submit`
    if not ray.is_initialized():
        if address:
            print(f"joining the Ray cluster at {address}", flush=True)
            # Through Ray Client (ray://) Tune's driver loop, and so MLflowTrials' lines, run on the head node.
            ray.init(address=address, log_to_driver=address.startswith("ray://"))
        else:
            # Ray binds to the machine's network address by default; a local sweep needs loopback only. The
            # variable is read by Ray's node-address lookup (and by the processes it starts).
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
            ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
            ray.init(
                num_cpus=opts.num_cpus or os.cpu_count(),
                num_gpus=torch.cuda.device_count(),
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                log_to_driver=False,
            )
        started = True
    try:
        _check_resources(opts)
        yield
    finally:
        if started:
            ray.shutdown()


def _check_resources(opts: SweepOptions) -> None:
    have = ray.cluster_resources()
    cpus, gpus = have.get("CPU", 0), have.get("GPU", 0)
    if opts.cpus_per_trial <= cpus and opts.gpus_per_trial <= gpus:
        return
    msg = (
        f"a trial asks for {opts.cpus_per_trial:g} CPU(s) and {opts.gpus_per_trial:g} GPU(s) but Ray has "
        f"{cpus:g} CPU(s) and {gpus:g} GPU(s)"
    )
    if opts.address or os.environ.get("RAY_ADDRESS"):  # an autoscaling cluster may still grow
        print(f"warning: {msg}; trials wait until the cluster grows", file=sys.stderr, flush=True)
    else:
        raise ConfigError(f"{msg}; lower --cpus-per-trial / --gpus-per-trial or raise --num-cpus")


STATUS_EVERY_S = 30.0
SKIP_METRICS = {*AUTO_RESULT_KEYS, "done", "trial_id", "experiment_tag", "should_checkpoint", "finished"}


def _short_error(error: Any) -> str:
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
            t for t in trials if _number((t.last_result or {}).get(h.metric)) and math.isfinite(t.last_result[h.metric])
        ]
        best = ""
        if scored:
            top = (min if h.mode == "min" else max)(scored, key=lambda t: t.last_result[h.metric])
            best = f" | best {h.metric} {_fmt(top.last_result[h.metric])} ({top.trial_id})"
        counts = ", ".join(f"{n} {state}" for state, n in states.items() if n)
        elapsed = datetime.timedelta(seconds=round(time.time() - self._started))
        print(f"[sweep] {len(trials)} trials: {counts}{best} | {elapsed}", flush=True)

    def _safe(self, what: str, fn, *args) -> None:
        if self._off:
            return
        try:
            fn(*args)
        except Exception as err:  # tracking never stops a sweep
            self._off = True
            print(
                f"warning: MLflow {what} failed ({type(err).__name__}: {err}); the sweep goes on without "
                "per-trial tracking",
                file=sys.stderr,
                flush=True,
            )

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        print(f"[trial {trial.trial_id}] started: {_fmt_config(trial.config)}", flush=True)
        self._safe("child run", lambda: self.runs.child(trial.trial_id, self._params(trial)))

    def _params(self, trial) -> dict[str, Any]:
        return {**self.fixed, **trial.config}

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        def log() -> None:
            step = int(result.get(self.headline.step_key, self._last_step.get(trial.trial_id, 0)))
            self._last_step[trial.trial_id] = step
            metrics = {k: v for k, v in result.items() if k not in SKIP_METRICS and _number(v)}
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
            extra = "".join(f", {k} {_fmt(last[k])}" for k in h.show if k in last)
            line = f"{h.metric} {_fmt(last.get(h.metric))}{extra}"
        else:
            outcome = "stopped"
            line = f"stopped by ASHA at {h.step_key} {last.get(h.step_key)} ({h.metric} {_fmt(last.get(h.metric))})"
        print(f"[trial {trial.trial_id}] {outcome}: {line}", flush=True)

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
        error = _short_error(local.read_text() if local and local.exists() else trial.get_error() or "unknown error")
        print(f"[trial {trial.trial_id}] ERROR: {error}", flush=True)

        def log() -> None:
            run_id = self.runs.child(trial.trial_id, self._params(trial))
            self.runs.set_tags(run_id, {"brainlm.outcome": "error", "brainlm.error": error})
            self.runs.end(run_id, "FAILED")

        self._safe("end child run", log)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _show(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Rows with numbers to 4 significant digits, for the printed table."""
    return [{k: _fmt(v) for k, v in r.items()} for r in rows]


def _fmt_config(config: dict[str, Any]) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in sorted(config.items()))


def _asha(time_attr: str, max_t: int, default_grace: int, opts: SweepOptions) -> ASHAScheduler:
    """ASHA on ``time_attr`` up to ``max_t``; the trials that reach it are not stopped, because a trial's last
    report (its model) comes after max_t."""
    return ASHAScheduler(
        time_attr=time_attr,
        max_t=max_t,
        grace_period=min(opts.grace_period or default_grace, max_t),
        reduction_factor=opts.reduction_factor,
        stop_last_trials=False,
    )


def _fit(
    trainable,
    param_space: dict[str, Any],
    headline: Headline,
    scheduler,
    opts: SweepOptions,
    runs: Any,
    fixed: dict[str, Any],
    metric: bool = True,
) -> tune.ResultGrid:
    """Run (or with ``--resume`` continue) the experiment ``storage/name``; failed trials do not stop it."""
    storage = _storage(opts)
    fs = _storage_filesystem(storage)
    if fs is not None:  # with an explicit filesystem Ray takes paths inside it: bucket/prefix
        storage = storage.split("://", 1)[1]
    path = f"{storage.rstrip('/')}/{opts.name}"
    exists = tune.Tuner.can_restore(path, storage_filesystem=fs)
    if opts.resume:
        if not exists:
            raise ConfigError(
                f"--resume: no sweep {opts.name!r} under {storage} (no experiment state at {path}); "
                "check --storage and --name"
            )
        print(
            f"resuming {path}: unfinished trials go on"
            + ("; errored trials start again" if opts.retry_errored else "; errored trials stay errored"),
            flush=True,
        )
        tuner = tune.Tuner.restore(
            path,
            trainable,
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=opts.retry_errored,
            storage_filesystem=fs,
        )
    else:
        if exists:
            raise ConfigError(
                f"a sweep named {opts.name!r} already exists at {path}; pass --resume to continue it or another --name"
            )
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=headline.metric if metric else None,
                mode=headline.mode if metric else None,
                scheduler=scheduler,
                num_samples=opts.samples,
                trial_name_creator=lambda t: t.trial_id,
                trial_dirname_creator=lambda t: t.trial_id,
            ),
            run_config=tune.RunConfig(
                name=opts.name,
                storage_path=storage,
                storage_filesystem=fs,
                callbacks=[MLflowTrials(runs, headline, fixed)],
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                log_to_file=True,  # trials' own output goes to their folders, not over the progress lines
                verbose=0,  # MLflowTrials prints one line per trial event and a status line every 30 s
            ),
        )
    results = tuner.fit()
    # After Ctrl+C Tune saves the experiment's state and returns early. A trial ASHA stopped has done=True in its
    # last result and a finished one its final report; one that never started or was cut off has neither.
    unfinished = sum(
        1
        for r in results
        if not r.error and not (r.metrics or {}).get("finished") and not (r.metrics or {}).get("done")
    )
    if unfinished:
        with contextlib.suppress(Exception):
            runs.end(runs.parent_id, "KILLED")
        raise SweepInterrupted(
            f"sweep {opts.name} was interrupted with {unfinished} of {len(results)} trials unfinished; its state is "
            f"in {path}. Continue it with the same command and --resume --name {opts.name}"
        )
    return results


@dataclass
class TrialRow:
    trial_id: str
    outcome: str  # finished | stopped | error
    config: dict[str, Any]
    metrics: dict[str, Any]  # the last reported result
    history: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""
    checkpoint: Any = None


def _rows(results: tune.ResultGrid) -> list[TrialRow]:
    rows = []
    for r in results:
        metrics = dict(r.metrics or {})
        history = r.metrics_dataframe.to_dict("records") if r.metrics_dataframe is not None else []
        outcome = "error" if r.error else "finished" if metrics.get("finished") else "stopped"
        rows.append(
            TrialRow(
                Path(r.path).name,
                outcome,
                dict(r.config or {}),
                metrics,
                history,
                _short_error(r.error) if r.error else "",
                r.checkpoint,
            )
        )
    return sorted(rows, key=lambda t: t.trial_id)


def _best(rows: list[TrialRow], metric: str, mode: str) -> TrialRow | None:
    done = [
        r
        for r in rows
        if r.outcome == "finished" and _number(r.metrics.get(metric)) and math.isfinite(r.metrics[metric])
    ]
    if not done:
        return None
    return (min if mode == "min" else max)(done, key=lambda r: r.metrics[metric])


def _counts(rows: list[TrialRow]) -> dict[str, int]:
    return {"trials": len(rows), **{k: sum(r.outcome == k for r in rows) for k in ("finished", "stopped", "error")}}


def _default_name(prefix: str) -> str:
    return f"{prefix}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "x"


def _out_dir(opts: SweepOptions) -> Path:
    out = Path(opts.out or Path("runs") / "sweeps" / opts.name)
    out.mkdir(parents=True, exist_ok=True)
    return out


def markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(v: Any) -> str:
        return _fmt(v).replace("|", "/")

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def tsv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    return "\n".join(["\t".join(columns), *("\t".join(_fmt(r.get(c, "")) for c in columns) for r in rows)]) + "\n"


def _write_summary(
    out: Path,
    stem: str,
    title: str,
    rows: list[dict[str, Any]],
    columns: list[str],
    summary: dict[str, Any],
    notes: list[str],
) -> list[Path]:
    """``stem``.md (title, table, notes), ``stem``.tsv and ``stem``.json."""
    md = out / f"{stem}.md"
    md.write_text(f"# {title}\n\n{markdown(rows, columns)}\n\n" + "".join(f"{n}\n\n" for n in notes))
    (out / f"{stem}.tsv").write_text(tsv(rows, columns))
    (out / f"{stem}.json").write_text(json.dumps({**summary, "rows": rows}, indent=1, default=_jsonable))
    return [md, out / f"{stem}.tsv", out / f"{stem}.json"]


def _trials_figure(rows: list[TrialRow], x: str, y: str, path: Path, title: str, best: TrialRow | None) -> Path:
    """``y`` against ``x`` for every trial from its reported history (dashed: stopped early by ASHA)."""
    from brainlm.eval import plots

    histories = {r.trial_id: [(h[x], h[y]) for h in r.history if _number(h.get(x)) and _number(h.get(y))] for r in rows}
    outcomes = {r.trial_id: r.outcome for r in rows}
    return plots.trials_figure(histories, outcomes, path, x, y, title, best.trial_id if best else None)


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


def _trial_table(rows: list[TrialRow], params: list[str], metrics: list[str]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        row = {"trial": r.trial_id, "outcome": r.outcome, **{p: r.config.get(p, "") for p in params}}
        for m in metrics:
            row[m] = r.metrics.get(m, "") if r.outcome != "error" else ""
        out.append(row)
    return out


def _error_notes(rows: list[TrialRow]) -> list[str]:
    return [f"errored trial {r.trial_id} ({_fmt_config(r.config)}): {r.error}" for r in rows if r.outcome == "error"]


def _git_sha() -> str:
    from brainlm.tracking.env import git_sha

    return git_sha()


def _finish_parent(
    runs: Any, parent: str, rows: list[TrialRow], files: list[Path], metrics: dict[str, float], tags: dict[str, Any]
) -> None:
    counts = _counts(rows)
    try:
        runs.log_metrics(parent, {**{f"trials_{k}": v for k, v in counts.items()}, **metrics}, 0)
        runs.set_tags(parent, tags)
        for p in files:
            runs.log_artifact(parent, p, "summary")
        runs.end(parent, "FINISHED" if counts["finished"] else "FAILED")
    except Exception as err:  # the results are on disk either way
        print(
            f"warning: MLflow could not record the sweep's summary ({type(err).__name__}: {err}); it is in "
            f"{files[0].parent}",
            file=sys.stderr,
            flush=True,
        )
