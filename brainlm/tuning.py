"""Ray Tune sweeps (``python launcher/tune.py finetune|perturb|scale``): the Ray side of brainlm.

- ``finetune_sweep``: ASHA over FinetuneConfig knobs; every trial runs ``train_one`` (what ``brainlm finetune``
  runs) on data loaded once by ``load_data`` on the driver and shared through Ray's object store; the best
  trial's model is registered as ``brainlm-finetuned-<target>`` with alias ``champion``.
- ``perturb_sweep``: ASHA over PerturbConfig knobs; every trial runs ``optimise`` (what ``brainlm perturb``
  runs), scored by ``perturb_score``.
- ``scale_sweep``: a grid of width x depth x mask ratio x compute budget; every trial runs
  ``brainlm.training.pretrain.run`` (what ``launcher/pretrain.py`` runs) for budget / (FLOPs per sample x
  global batch) steps; ends in a figure and tables of validation masked R^2 against compute and parameters.

A scaling trial is one process (a world of one) on the resources it is given. To spread one trial over several
GPUs on a cluster, run ``scale_trial``'s call of ``pretrain.run`` inside a Ray Train ``TorchTrainer`` (one worker
per GPU, ``ScalingConfig(num_workers=N, use_gpu=True)``) and pass the trainer to the Tuner instead of the
function: every worker calls ``pretrain.run`` with RANK / WORLD_SIZE / MASTER_ADDR from Ray Train, exactly as
under torchrun, and rank 0 reports. Not built here: one CPU process per trial is what a laptop needs.

Search spaces are YAML files whose keys are config fields (``load_space``). MLflow: one parent run per sweep
and a child per trial, written from the driver only (``MLflowTrials``, through ``brainlm.registry.SweepRuns``):
trials send results back, so parallel trials never contend for a sqlite store.

ray is imported here and in launcher/tune.py only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import difflib
import json
import math
import os
import re
import socket
import sys
import tempfile
import time
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
import yaml
from ray import tune
from ray.tune.result import AUTO_RESULT_KEYS
from ray.tune.schedulers import ASHAScheduler

from brainlm.config import _coerce, _types_of, build_recipe, global_batch
from brainlm.eval import plots
from brainlm.eval.common import load_context, parse_where, recordings, table
from brainlm.eval.finetune import FinetuneConfig, FinetuneData, load_data, save_finetuned, train_one
from brainlm.eval.perturb import PerturbConfig, magnitude, optimise, top_report
from brainlm.exceptions import BrainLMError, ConfigError, SweepInterrupted
from brainlm.model import BrainLM
from brainlm.training.pretrain import NonFiniteLossError

ROOT = Path(__file__).resolve().parents[1]
SPACES = ROOT / "configs" / "tune"

# Fields a search space may not vary, and why: they define the task, the data or the trial's budget.
FINETUNE_FIXED = {
    "target": "it is the task; run one sweep per target",
    "task": "it is the task (regression or classification)",
    "transform": "the validation loss is measured in the transformed space, so trials would not be comparable",
    "epochs": "it is ASHA's budget per trial (max_t); set it with --epochs",
    "seeds": "every trial trains one seed; ASHA compares trials, not seeds",
    "min_subjects": "it decides which data is used, which the trials share",
}
PERTURB_FIXED = {
    "source": "it is the question (the source state); set it with --source",
    "target": "it is the question (the target state); set it with --target",
    "split": "it decides which recordings are used, which the trials share",
    "max_windows": "it decides which windows are used, which the trials share",
    "top_fraction": "it only changes the report, not the optimisation",
}


# -- search spaces ------------------------------------------------------------------------------------------

RANGES = {"uniform": float, "loguniform": float, "quniform": float, "randint": int, "lograndint": int}
LISTS = ("choice", "grid")
SPEC_HELP = (
    "{uniform|loguniform: [low, high]}, {quniform: [low, high, q]}, {randint|lograndint: [low, high]} "
    "(high excluded), {choice: [values]}, {grid: [values]} or a plain value"
)


@dataclass
class Dist:
    """One key of a search space: a distribution (or a grid, or a fixed value) and its arguments."""

    kind: str
    args: list[Any]

    def to_tune(self) -> Any:
        if self.kind == "fixed":
            return self.args[0]
        if self.kind == "choice":
            return tune.choice(self.args)
        if self.kind == "grid":
            return tune.grid_search(self.args)
        if self.kind in ("randint", "lograndint"):
            return getattr(tune, self.kind)(int(self.args[0]), int(self.args[1]))
        return getattr(tune, self.kind)(*self.args)

    def examples(self) -> list[Any]:
        """Values to validate: every listed value, or a range's ends."""
        if self.kind in ("randint", "lograndint"):
            return [int(self.args[0]), int(self.args[1]) - 1]
        return list(self.args) if self.kind in (*LISTS, "fixed") else self.args[:2]

    def largest(self) -> Any:
        return max(self.examples())

    def __str__(self) -> str:
        return str(self.args[0]) if self.kind == "fixed" else f"{self.kind}{self.args}"


def _parse_dist(where: str, spec: Any, annotation: Any) -> Dist:
    if not isinstance(spec, dict):
        return Dist("fixed", [spec])
    if len(spec) != 1 or next(iter(spec)) not in (*RANGES, *LISTS):
        raise ConfigError(f"{where}: expected {SPEC_HELP}; got {spec!r}")
    kind, args = next(iter(spec.items()))
    if kind in LISTS:
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: `{kind}` takes a non-empty list of values, got {args!r}")
        return Dist(kind, args)
    n = 3 if kind == "quniform" else 2
    if not isinstance(args, list) or len(args) != n:
        raise ConfigError(f"{where}: `{kind}` takes [low, high{', q' if n == 3 else ''}], got {args!r}")
    try:
        nums = [float(a) for a in args]  # YAML 1.1 reads 1e-4 (no dot) as a string
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: `{kind}` bounds must be numbers, got {args!r}") from None
    low, high = nums[0], nums[1]
    if RANGES[kind] is int:
        if not all(x.is_integer() for x in nums):
            raise ConfigError(f"{where}: `{kind}` bounds must be integers, got {args!r}")
        nums = [int(x) for x in nums]
    if low >= high:
        raise ConfigError(f"{where}: `{kind}` low ({args[0]}) must be below high ({args[1]})")
    if kind.startswith("log") and low <= 0:
        raise ConfigError(f"{where}: `{kind}` needs low > 0, got {args[0]}")
    allowed = _types_of(annotation)
    if RANGES[kind] is float and float not in allowed:
        names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise ConfigError(f"{where}: `{kind}` draws floats but the field takes {names}; use randint or choice")
    if RANGES[kind] is int and int not in allowed and float not in allowed:
        raise ConfigError(f"{where}: `{kind}` draws integers but the field takes {allowed[0].__name__}; use choice")
    return Dist(kind, nums)


def load_space(path: str | Path, cls: type, base: Any, fixed: dict[str, str]) -> dict[str, Dist]:
    """Read a search-space YAML whose keys are fields of ``cls``; every value is checked against the field's
    type and ``cls``'s own validation (on ``base`` with that value), and errors name the key."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"search space {path} does not exist; the shipped ones live in {SPACES}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"search space {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"search space {path}: expected a mapping of {cls.__name__} fields to distributions, "
            f"got {type(raw).__name__}"
        )
    names = [f.name for f in dataclasses.fields(cls)]
    searchable = [n for n in names if n not in fixed]
    hints = typing.get_type_hints(cls)
    space: dict[str, Dist] = {}
    for key, spec in raw.items():
        where = f"search space {path}, key `{key}`"
        if key in fixed:
            raise ConfigError(f"{where} cannot be searched: {fixed[key]}. Searchable keys: {', '.join(searchable)}")
        if key not in names:
            close = difflib.get_close_matches(str(key), searchable, n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise ConfigError(
                f"search space {path}: unknown key `{key}`{hint}; valid keys ({cls.__name__} fields): "
                f"{', '.join(searchable)}"
            )
        dist = _parse_dist(where, spec, hints[key])
        for value in dist.examples():
            try:
                dataclasses.replace(base, **{key: _coerce(key, value, hints[key])})
            except ConfigError as err:
                raise ConfigError(f"{where}: value {value!r} is invalid: {err}") from None
        space[key] = dist
    if not any(d.kind != "fixed" for d in space.values()):
        raise ConfigError(f"search space {path} varies nothing; give at least one key a distribution ({SPEC_HELP})")
    return space


def check_flags_vs_space(space: dict[str, Dist], base: Any, path: str | Path) -> None:
    """A knob set by a flag (not at its default) and searched by the space is ambiguous: refuse it."""
    for f in dataclasses.fields(base):
        if f.name in space and f.default is not dataclasses.MISSING and getattr(base, f.name) != f.default:
            raise ConfigError(
                f"--{f.name.replace('_', '-')} {getattr(base, f.name)} is set but `{f.name}` is searched in {path} "
                f"({space[f.name]}); drop the flag or the key"
            )


def apply_config(base: Any, config: dict[str, Any]) -> Any:
    """``base`` with a trial's values (type-checked again: Tune may hand back numpy scalars)."""
    hints = typing.get_type_hints(type(base))
    values = {}
    for k, v in config.items():
        if isinstance(v, np.generic):
            v = v.item()
        values[k] = _coerce(k, v, hints[k])
    return dataclasses.replace(base, **values)


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
    from brainlm.training.pretrain import git_sha

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


# -- fine-tuning sweeps -------------------------------------------------------------------------------------


def finetune_trial(config: dict[str, Any], data: FinetuneData, threads: int) -> None:
    """One trial: ``train_one`` with the trial's FinetuneConfig; reports after every epoch (for ASHA), then
    once more with the model at its best epoch as the checkpoint."""
    torch.set_num_threads(max(1, threads))
    cfg = apply_config(data.cfg, config)
    data = dataclasses.replace(data, cfg=cfg)

    def report(epoch: int, metrics: dict[str, float]) -> None:
        if not math.isfinite(metrics["val_loss"]):
            raise NonFiniteLossError(
                f"epoch {epoch}: the validation loss is {metrics['val_loss']}; these settings diverge "
                f"({_fmt_config(config)}): lower lr or narrow the search space"
            )
        tune.report(dict(metrics))

    model, test, history = train_one(data, 0, report)
    best = min(history, key=lambda h: h["val_loss"])
    with tempfile.TemporaryDirectory() as tmp:
        save_finetuned(model, data, Path(tmp) / "model")
        (Path(tmp) / "trial.json").write_text(
            json.dumps({"config": dataclasses.asdict(cfg), "history": history, "test": test}, indent=1)
        )
        tune.report(
            {
                "val_loss": best["val_loss"],
                "best_epoch": best["epoch"],
                **{f"test_{k}": v for k, v in test.items()},
                "finished": 1,
            },
            checkpoint=tune.Checkpoint.from_directory(tmp),
        )


def finetune_sweep(
    model: str,
    shards: str,
    base: FinetuneConfig,
    space_path: str | Path,
    opts: SweepOptions,
    register_as: str | None = None,
    alias: str = "champion",
) -> dict[str, Any]:
    """ASHA over the knobs of ``space_path``; logs to MLflow; registers the best trial's model."""
    from brainlm.registry import SweepRuns, lineage, tracking_store

    base = dataclasses.replace(base, seeds=1)
    space = load_space(space_path, FinetuneConfig, base, FINETUNE_FIXED)
    check_flags_vs_space(space, base, space_path)
    classification = base.task == "classification"
    keys = ["accuracy", "auc"] if classification else ["mse", "r2", "pearson_r"]
    register_as = register_as or f"brainlm-finetuned-{_slug(base.target)}"
    opts.name = opts.name or _default_name(f"finetune-{_slug(base.target)}")
    pre = lineage(model)  # fails early on a missing registry entry
    ctx = load_context(model, shards)
    data = load_data(ctx, base)  # once, on the driver: errors surface before Ray starts; trials share it
    if (ctx.model.extra or {}).get("manifest_sha256"):  # the data the backbone was pretrained on
        pre["pretrained_manifest_sha256"] = ctx.model.extra["manifest_sha256"]
    manifest_sha = ctx.manifest.plan_sha256
    headline = Headline("val_loss", "min", "epoch", (f"test_{keys[0]}", "best_epoch"))
    runs = SweepRuns(opts.experiment)
    print(f"MLflow store: {tracking_store()}; experiment {opts.experiment}", flush=True)
    print(
        f"finetune sweep {opts.name}: {base.target} ({base.task}, {base.transform}), {opts.samples} sample(s) "
        f"of {space_path}, up to {base.epochs} epochs per trial, ASHA on val_loss "
        f"({'-accuracy' if classification else 'MSE in the transformed space'}); "
        f"{sum(len(d.windows_NRW) for d in data.splits.values())} windows shared by every trial",
        flush=True,
    )
    with ray_session(opts):
        parent = runs.open_parent(
            opts.name,
            f"{_storage(opts)}/{opts.name}",
            {
                "kind": "finetune",
                "model": model,
                "shards": str(shards),
                "fixed": dataclasses.asdict(base),
                "space": {k: str(d) for k, d in space.items()},
                "samples": opts.samples,
                "cpus_per_trial": opts.cpus_per_trial,
                "gpus_per_trial": opts.gpus_per_trial,
            },
            {
                "brainlm.kind": "finetune",
                "target": base.target,
                "manifest_sha256": manifest_sha,
                "git_sha": _git_sha(),
                **pre,
            },
            opts.resume,
        )
        trainable = tune.with_resources(
            tune.with_parameters(finetune_trial, data=data, threads=int(max(1, opts.cpus_per_trial))),
            {"cpu": opts.cpus_per_trial, "gpu": opts.gpus_per_trial},
        )
        scheduler = ASHAScheduler(
            time_attr="epoch",
            max_t=base.epochs,
            grace_period=min(opts.grace_period or 1, base.epochs),
            reduction_factor=opts.reduction_factor,
            stop_last_trials=False,
        )  # a trial's last report (the model) comes after max_t
        results = _fit(
            trainable,
            {k: d.to_tune() for k, d in space.items()},
            headline,
            scheduler,
            opts,
            runs,
            {"model": model, "shards": str(shards), **dataclasses.asdict(base)},
        )
    rows = _rows(results)
    best = _best(rows, "val_loss", "min")
    registered = None
    if best is not None:
        child = runs.child(best.trial_id, best.config)
        tags = {
            **pre,
            "manifest_sha256": manifest_sha,
            "target": base.target,
            "task": base.task,
            "transform": base.transform,
            "sweep": opts.name,
            "sweep_run_id": parent,
            "trial_id": best.trial_id,
            "val_loss": best.metrics["val_loss"],
            "git_sha": _git_sha(),
            **{f"test_{k}": best.metrics.get(f"test_{k}") for k in keys},
        }
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(best.checkpoint.to_directory(tmp)) / "model"
            try:
                version, before = runs.register(child, folder, register_as, alias, tags)
            except BrainLMError:
                raise
            except Exception as err:
                raise BrainLMError(
                    f"the sweep finished but registering its best model (trial {best.trial_id}) in "
                    f"{runs.uri} failed ({type(err).__name__}: {err}); the model is in {best.checkpoint.path}/model"
                ) from err
        registered = {
            "name": register_as,
            "version": version,
            "alias": alias,
            "previous": before,
            "uri": f"models:/{register_as}@{alias}",
        }
    params = list(space)
    metric_cols = ["epoch", "val_loss", *(f"test_{k}" for k in keys)]
    table_rows = []
    for row, r in zip(_trial_table(rows, params, metric_cols), rows, strict=True):
        # a stopped trial's last report is its last epoch; its best epoch is in its history
        seen = [h["val_loss"] for h in r.history if _number(h.get("val_loss")) and "epoch" in h]
        if r.outcome == "finished":
            row["epoch"] = max((h["epoch"] for h in r.history if _number(h.get("epoch"))), default="")
        if seen and r.outcome == "stopped":
            row["val_loss"] = min(seen)
        row["best"] = "*" if best is not None and r.trial_id == best.trial_id else ""
        table_rows.append(row)
    counts = _counts(rows)
    title = (
        f"finetune sweep {opts.name}: {base.target}, {counts['trials']} trials ({counts['finished']} finished, "
        f"{counts['stopped']} stopped early by ASHA, {counts['error']} errored); val_loss: lower is better"
    )
    notes = _error_notes(rows)
    if registered:
        notes.insert(
            0,
            f"best trial {best.trial_id}: registered {registered['uri']} (version {registered['version']}"
            + (f", was version {registered['previous']}" if registered["previous"] else "")
            + ")",
        )
    columns = ["trial", "outcome", *params, *metric_cols, "best"]
    summary = {
        "name": opts.name,
        "kind": "finetune",
        "target": base.target,
        "counts": counts,
        "best_trial": best.trial_id if best else None,
        "best_config": best.config if best else None,
        "best_metrics": {k: best.metrics.get(k) for k in ["val_loss", *(f"test_{k}" for k in keys)]} if best else None,
        "registered": registered,
        "parent_run_id": parent,
        "lineage": pre,
        "manifest_sha256": manifest_sha,
    }
    out = _out_dir(opts)
    files = _write_summary(out, "summary", title, table_rows, columns, summary, notes)
    files.append(_trials_figure(rows, "epoch", "val_loss", out / "trials.png", title, best))
    best_metrics = {f"best_{k}": v for k, v in (summary["best_metrics"] or {}).items() if _number(v)}
    _finish_parent(
        runs,
        parent,
        rows,
        files,
        best_metrics,
        {
            "best_trial": summary["best_trial"] or "none",
            **({"registered_model": register_as, "registered_version": registered["version"]} if registered else {}),
        },
    )
    print("\n" + table(_show(table_rows), columns, title))
    for note in notes:
        print(note)
    print(f"summary: {files[0]} (and .tsv, .json); MLflow parent run {parent} in experiment {opts.experiment}")
    if best is None:
        raise BrainLMError(
            f"no trial of sweep {opts.name} finished ({counts['error']} errored, {counts['stopped']} "
            f"stopped); see the errors above and {out / 'summary.md'}"
        )
    return summary


# -- perturbation sweeps ------------------------------------------------------------------------------------


def perturb_score(reached: float, mean_abs_theta: float, budget: float) -> float:
    """reached - max(0, mean|theta| - budget) / budget.

    ``reached`` is the share of the source-to-target embedding distance the perturbation closes (1: the
    target is reached, 0: nothing moved). The penalty is zero while the perturbation stays within the
    sparsity budget (mean |theta|, in robust-scaled signal units) and grows with the relative excess: twice the
    budget costs 1, the whole range of ``reached``. Higher is better."""
    return float(reached - max(0.0, mean_abs_theta - budget) / budget)


def perturb_trial(
    config: dict[str, Any],
    ctx,
    source: np.ndarray,
    target: np.ndarray,
    base: PerturbConfig,
    budget: float,
    threads: int,
) -> None:
    """One trial: ``optimise`` with the trial's PerturbConfig; reports every 20 steps (for ASHA), then the
    final score with theta and the per-parcel report as the checkpoint."""
    torch.set_num_threads(max(1, threads))
    cfg = apply_config(base, config)

    def report(step: int, m: dict[str, float]) -> None:
        if not math.isfinite(m["match"]):
            raise NonFiniteLossError(
                f"step {step}: the matching loss is {m['match']}; these settings diverge "
                f"({_fmt_config(config)}): lower lr"
            )
        reached = 1.0 - m["match"]
        tune.report(
            {
                "step": step,
                "reached": reached,
                "mean_abs_theta": m["l1"],
                "score": perturb_score(reached, m["l1"], budget),
            }
        )

    theta, reach = optimise(ctx, source, target, cfg, report)
    mag = magnitude(theta, cfg.form)
    atlas = ctx.manifest.atlas
    top = top_report(mag, atlas.networks, atlas.labels, cfg.top_fraction)
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "theta.npy", theta.numpy())
        (Path(tmp) / "perturbation.json").write_text(
            json.dumps(
                {
                    "config": dataclasses.asdict(cfg),
                    **reach,
                    "magnitude": mag.round(6).tolist(),
                    "parcels": atlas.labels,
                    **top,
                },
                indent=1,
                default=_jsonable,
            )
        )
        tune.report(
            {"score": perturb_score(reach["reached"], reach["mean_abs_theta"], budget), **reach, "finished": 1},
            checkpoint=tune.Checkpoint.from_directory(tmp),
        )


def perturb_sweep(
    model: str, shards: str, base: PerturbConfig, space_path: str | Path, opts: SweepOptions, budget: float = 0.1
) -> dict[str, Any]:
    """ASHA over the knobs of ``space_path``, scored by ``perturb_score``; logs to MLflow."""
    from brainlm.registry import SweepRuns, lineage, tracking_store

    if budget <= 0:
        raise ConfigError(f"--theta-budget must be > 0, got {budget}")
    space = load_space(space_path, PerturbConfig, base, PERTURB_FIXED)
    check_flags_vs_space(space, base, space_path)
    opts.name = opts.name or _default_name("perturb")
    pre = lineage(model)
    ctx = load_context(model, shards)

    def windows(expr: str) -> np.ndarray:
        recs = recordings(ctx, base.split, where=parse_where(expr))
        return np.concatenate([r.windows_NRW for r in recs])[: base.max_windows]

    source, target = windows(base.source), windows(base.target)
    max_steps = int(space["steps"].largest()) if "steps" in space else base.steps
    headline = Headline("score", "max", "step", ("reached", "mean_abs_theta"))
    runs = SweepRuns(opts.experiment)
    print(f"MLflow store: {tracking_store()}; experiment {opts.experiment}", flush=True)
    print(
        f"perturb sweep {opts.name}: {base.source} -> {base.target} ({len(source)} source, {len(target)} target "
        f"windows), {opts.samples} sample(s) of {space_path}; score = reached - max(0, mean|theta| - {budget:g}) / "
        f"{budget:g}, higher is better",
        flush=True,
    )
    with ray_session(opts):
        parent = runs.open_parent(
            opts.name,
            f"{_storage(opts)}/{opts.name}",
            {
                "kind": "perturb",
                "model": model,
                "shards": str(shards),
                "fixed": dataclasses.asdict(base),
                "space": {k: str(d) for k, d in space.items()},
                "samples": opts.samples,
                "theta_budget": budget,
            },
            {"brainlm.kind": "perturb", "manifest_sha256": ctx.manifest.plan_sha256, "git_sha": _git_sha(), **pre},
            opts.resume,
        )
        trainable = tune.with_resources(
            tune.with_parameters(
                perturb_trial,
                ctx=ctx,
                source=source,
                target=target,
                base=base,
                budget=budget,
                threads=int(max(1, opts.cpus_per_trial)),
            ),
            {"cpu": opts.cpus_per_trial, "gpu": opts.gpus_per_trial},
        )
        scheduler = ASHAScheduler(
            time_attr="step",
            max_t=max_steps,
            grace_period=min(opts.grace_period or 40, max_steps),
            reduction_factor=opts.reduction_factor,
            stop_last_trials=False,
        )  # a trial's last report (the model) comes after max_t
        results = _fit(
            trainable,
            {k: d.to_tune() for k, d in space.items()},
            headline,
            scheduler,
            opts,
            runs,
            {"model": model, "shards": str(shards), **dataclasses.asdict(base)},
        )
    rows = _rows(results)
    best = _best(rows, "score", "max")
    params = list(space)
    metric_cols = ["step", "score", "reached", "mean_abs_theta"]
    table_rows = _trial_table(rows, params, metric_cols)
    for row, r in zip(table_rows, rows, strict=True):
        if r.outcome == "finished":
            row["step"] = int(apply_config(base, r.config).steps)
        row["best"] = "*" if best is not None and r.trial_id == best.trial_id else ""
    counts = _counts(rows)
    title = (
        f"perturb sweep {opts.name}: {base.source} -> {base.target}, {counts['trials']} trials "
        f"({counts['finished']} finished, {counts['stopped']} stopped early by ASHA, {counts['error']} errored); "
        "score: higher is better"
    )
    notes = _error_notes(rows)
    out = _out_dir(opts)
    files: list[Path] = []
    summary: dict[str, Any] = {
        "name": opts.name,
        "kind": "perturb",
        "counts": counts,
        "theta_budget": budget,
        "best_trial": best.trial_id if best else None,
        "best_config": best.config if best else None,
        "parent_run_id": parent,
    }
    if best is not None:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(best.checkpoint.to_directory(tmp))
            detail = json.loads((folder / "perturbation.json").read_text())
            (out / "best_perturbation.json").write_text(json.dumps(detail, indent=1))
            np.save(out / "best_theta.npy", np.load(folder / "theta.npy"))
        files += [out / "best_perturbation.json", out / "best_theta.npy"]
        cfg = apply_config(base, best.config)
        rerun = (
            f"brainlm perturb --model {model} --shards {shards} --out runs/perturb/{opts.name} "
            f"--source {cfg.source} --target {cfg.target} --form {cfg.form} --pooling {cfg.pooling} "
            f"--l1 {cfg.l1:.6g} --lr {cfg.lr:.6g} --steps {cfg.steps}"
        )
        summary["best_metrics"] = {k: best.metrics.get(k) for k in ("score", "reached", "mean_abs_theta")}
        summary["top_parcels"] = detail.get("top_parcels")
        summary["rerun"] = rerun
        notes.insert(
            0,
            f"best trial {best.trial_id}: top parcels {', '.join(detail.get('top_parcels', [])[:10])}; "
            f"figures and the full report: {rerun}",
        )
    columns = ["trial", "outcome", *params, *metric_cols, "best"]
    files = [
        *_write_summary(out, "summary", title, table_rows, columns, summary, notes),
        _trials_figure(rows, "step", "score", out / "trials.png", title, best),
        *files,
    ]
    _finish_parent(
        runs,
        parent,
        rows,
        files,
        {f"best_{k}": v for k, v in (summary.get("best_metrics") or {}).items() if _number(v)},
        {"best_trial": summary["best_trial"] or "none"},
    )
    print("\n" + table(_show(table_rows), ["trial", "outcome", *params, *metric_cols, "best"], title))
    for note in notes:
        print(note)
    print(f"summary: {files[0]} (and .tsv, .json); MLflow parent run {parent} in experiment {opts.experiment}")
    if best is None:
        raise BrainLMError(f"no trial of sweep {opts.name} finished; see the errors above and {out / 'summary.md'}")
    return summary


# -- scaling sweeps -----------------------------------------------------------------------------------------


# Recipe keys every scaling run sets itself (from the grid and the budget, and a folder per trial).
SWEEP_SETS = {
    "model.hidden_size",
    "model.num_layers",
    "model.num_heads",
    "model.intermediate_size",
    "model.mask_ratio",
    "train.max_steps",
    "train.out_dir",
    "train.resume",
    "train.export",
    "tracking.enabled",
}


@dataclass
class Shape:
    """One point of a scaling sweep: a model shape, its mask ratio and its compute budget."""

    width: int
    depth: int
    heads: int
    mlp: int
    mask_ratio: float
    budget: float
    params: int
    flops_per_sample: float
    global_batch: int
    steps: int

    @property
    def flops(self) -> float:
        """Training FLOPs actually spent (steps are whole, so at most the budget)."""
        return self.steps * self.global_batch * self.flops_per_sample

    def overrides(self) -> dict[str, Any]:
        return {
            "model.hidden_size": self.width,
            "model.num_layers": self.depth,
            "model.num_heads": self.heads,
            "model.intermediate_size": self.mlp,
            "model.mask_ratio": self.mask_ratio,
            "train.max_steps": self.steps,
        }


def plan_shape(
    recipe, num_parcels: int, width: int, depth: int, mask_ratio: float, budget: float, head_dim: int
) -> Shape:
    """The shape's heads (width // head_dim), MLP width (the recipe's MLP ratio), FLOPs and steps."""
    heads = max(1, width // head_dim)
    if width % heads:
        raise ConfigError(
            f"--widths {width}: not divisible by its {heads} heads (width // --head-dim {head_dim}); "
            f"use widths that are multiples of --head-dim"
        )
    ratio = recipe.model.mlp_dim / recipe.model.hidden_size
    mlp = max(1, round(ratio * width))
    cfg = dataclasses.replace(
        recipe.model,
        hidden_size=width,
        num_layers=depth,
        num_heads=heads,
        intermediate_size=mlp,
        mask_ratio=mask_ratio,
        num_parcels=num_parcels,
    )
    with torch.device("meta"):  # counts only: no memory for the weights
        model = BrainLM(cfg)
    fps = model.flops_per_sample(mask_ratio, num_parcels)
    gb = global_batch(recipe, 1)
    steps = int(budget // (fps * gb))
    if steps < 1:
        raise ConfigError(
            f"--budget {budget:.3g} FLOPs is less than one step of width {width} x depth {depth} (mask ratio "
            f"{mask_ratio}): {fps * gb:.3g} FLOPs per step ({fps:.3g} per sample x global batch {gb}); raise --budget"
        )
    return Shape(width, depth, heads, mlp, mask_ratio, budget, model.num_params(), fps, gb, steps)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scale_trial(
    config: dict[str, Any],
    raw_recipe: dict[str, Any],
    overrides: dict[str, Any],
    ds_config: dict[str, Any],
    num_parcels: int,
    head_dim: int,
    val_points: int,
    threads: int,
) -> None:
    """One trial: ``pretrain.run`` of one shape for its budget, in this process as a world of one; reports the
    validation curve (step, FLOPs spent, masked R^2) and the final numbers."""
    from brainlm.training.pretrain import run

    recipe = build_recipe(raw_recipe, overrides)
    shape = plan_shape(
        recipe,
        num_parcels,
        int(config["width"]),
        int(config["depth"]),
        float(config["mask_ratio"]),
        float(config["budget"]),
        head_dim,
    )
    out_dir = Path(tune.get_context().get_trial_dir()) / "run"
    cfg = build_recipe(
        raw_recipe,
        {
            **overrides,
            **shape.overrides(),
            "train.out_dir": str(out_dir),
            "train.resume": "auto",
            "train.val_every": max(1, shape.steps // val_points),
            "train.log_every": max(1, shape.steps // 20),
            "train.export": False,
            "tracking.enabled": False,
        },
    )
    # A world of one per trial, on its own port (trials share the machine), with the threads Ray gave it.
    os.environ.update(
        {
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()),
            "OMP_NUM_THREADS": str(max(1, threads)),
        }
    )
    result = run(cfg, ds_config)
    losses: dict[int, float] = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            losses[row["step"]] = row["loss"]
    for step, r2 in sorted(result.val_r2.items()):
        loss = losses.get(max((s for s in losses if s <= step), default=-1))
        tune.report(
            {
                "step": step,
                "flops": step * shape.flops_per_sample * shape.global_batch,
                "val_masked_r2": r2,
                **({"loss": loss} if loss is not None else {}),
            }
        )
    final = result.val_r2[max(result.val_r2)]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "metrics.jsonl").write_text((out_dir / "metrics.jsonl").read_text())
        (Path(tmp) / "recipe.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        tune.report(
            {
                "val_masked_r2": final,
                "params": shape.params,
                "flops": shape.flops,
                "steps": shape.steps,
                "flops_per_sample": shape.flops_per_sample,
                "heads": shape.heads,
                "finished": 1,
            },
            checkpoint=tune.Checkpoint.from_directory(tmp),
        )


def scale_sweep(
    shards: str,
    widths: list[int],
    depths: list[int],
    mask_ratios: list[float],
    budgets: list[float],
    opts: SweepOptions,
    recipe_path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    ds_config: str | Path = ROOT / "ds_config.json",
    head_dim: int = 32,
    val_points: int = 4,
) -> dict[str, Any]:
    """Width x depth x mask ratio x budget, one short pretraining run each; figure + tables + MLflow."""
    from brainlm.data.format import load_manifest
    from brainlm.registry import SweepRuns, tracking_store

    if not (widths and depths and mask_ratios and budgets):
        raise ConfigError("--widths, --depths, --mask-ratios and --budget each need at least one value")
    if head_dim < 1 or val_points < 1:
        raise ConfigError(f"--head-dim and --val-points must be at least 1, got {head_dim} and {val_points}")
    raw = {}
    if recipe_path is not None:
        if not Path(recipe_path).exists():
            raise ConfigError(f"--recipe {recipe_path} does not exist; recipes live in configs/pretrain/")
        raw = yaml.safe_load(Path(recipe_path).read_text()) or {}
    taken = sorted(set(overrides or {}) & SWEEP_SETS)
    if taken:
        raise ConfigError(
            f"{', '.join('--' + k for k in taken)}: set by the sweep for every run (--widths, --depths, --mask-ratios, "
            "--budget, --head-dim and a folder per trial); drop the flag"
        )
    # trials run in their own working folders (and on other machines): a local path must be absolute
    overrides = {**(overrides or {}), "data.shards": shards if "://" in shards else str(Path(shards).resolve())}
    recipe = build_recipe(raw, overrides)
    ds_path = Path(ds_config)
    if not ds_path.exists():
        raise ConfigError(f"--deepspeed {ds_path}: no such file; the default lives at the repository root")
    ds = json.loads(ds_path.read_text())
    manifest, _ = load_manifest(recipe.data.shards)
    R = manifest.atlas.num_parcels
    if manifest.crop < recipe.model.num_timepoints:
        raise ConfigError(
            f"{shards}: crops of {manifest.crop} timepoints are shorter than model.num_timepoints="
            f"{recipe.model.num_timepoints} of the recipe; pass --model.num_timepoints {manifest.crop} (or less, a "
            f"multiple of model.patch_size {recipe.model.patch_size})"
        )
    plan = [
        plan_shape(recipe, R, w, d, m, b, head_dim)
        for b in budgets
        for w in widths
        for d in depths
        for m in mask_ratios
    ]  # every point valid, or stop here
    opts.name = opts.name or _default_name("scale")
    headline = Headline("val_masked_r2", "max", "step", ("params", "steps"))
    runs = SweepRuns(opts.experiment)
    print(f"MLflow store: {tracking_store()}; experiment {opts.experiment}", flush=True)
    print(
        f"scale sweep {opts.name}: {len(plan)} runs ({len(widths)} widths x {len(depths)} depths x "
        f"{len(mask_ratios)} mask ratios x {len(budgets)} budgets), {R} parcels, global batch "
        f"{plan[0].global_batch}; steps = budget / (FLOPs per sample x global batch)",
        flush=True,
    )
    print(
        table(
            [
                {
                    "width": s.width,
                    "depth": s.depth,
                    "heads": s.heads,
                    "mask_ratio": s.mask_ratio,
                    "budget": f"{s.budget:.3g}",
                    "params": s.params,
                    "flops/sample": f"{s.flops_per_sample:.3g}",
                    "steps": s.steps,
                }
                for s in plan
            ],
            ["width", "depth", "heads", "mask_ratio", "budget", "params", "flops/sample", "steps"],
            "plan",
        ),
        flush=True,
    )
    with ray_session(opts):
        parent = runs.open_parent(
            opts.name,
            f"{_storage(opts)}/{opts.name}",
            {
                "kind": "scale",
                "shards": shards,
                "recipe": str(recipe_path),
                "overrides": overrides,
                "widths": widths,
                "depths": depths,
                "mask_ratios": mask_ratios,
                "budgets": budgets,
                "head_dim": head_dim,
                "global_batch": plan[0].global_batch,
            },
            {"brainlm.kind": "scale", "manifest_sha256": manifest.plan_sha256, "git_sha": _git_sha()},
            opts.resume,
        )
        trainable = tune.with_resources(
            tune.with_parameters(
                scale_trial,
                raw_recipe=raw,
                overrides=overrides,
                ds_config=ds,
                num_parcels=R,
                head_dim=head_dim,
                val_points=val_points,
                threads=int(max(1, opts.cpus_per_trial)),
            ),
            {"cpu": opts.cpus_per_trial, "gpu": opts.gpus_per_trial},
        )
        space = {
            "width": tune.grid_search(widths),
            "depth": tune.grid_search(depths),
            "mask_ratio": tune.grid_search(mask_ratios),
            "budget": tune.grid_search(budgets),
        }
        samples, opts.samples = opts.samples, 1  # a grid: every point once
        try:
            results = _fit(
                trainable, space, headline, None, opts, runs, {"recipe": str(recipe_path), **overrides}, metric=False
            )
        finally:
            opts.samples = samples
    rows = _rows(results)
    by_point = {(s.width, s.depth, s.mask_ratio, s.budget): s for s in plan}
    table_rows = []
    for r in rows:
        key = (int(r.config["width"]), int(r.config["depth"]), float(r.config["mask_ratio"]), float(r.config["budget"]))
        s = by_point.get(key) or plan_shape(recipe, R, *key, head_dim)
        table_rows.append(
            {
                "trial": r.trial_id,
                "budget": s.budget,
                "width": s.width,
                "depth": s.depth,
                "heads": s.heads,
                "mask_ratio": s.mask_ratio,
                "params": s.params,
                "steps": s.steps,
                "flops": s.flops,
                "val_masked_r2": r.metrics.get("val_masked_r2", "") if r.outcome == "finished" else "",
                "outcome": r.outcome,
            }
        )
    table_rows.sort(key=lambda x: (x["budget"], x["width"], x["depth"], x["mask_ratio"]))
    winners = []
    for b in sorted(set(budgets)):
        done = [x for x in table_rows if x["budget"] == b and _number(x["val_masked_r2"])]
        if done:
            w = max(done, key=lambda x: x["val_masked_r2"])
            w["wins"] = "*"
            winners.append(
                {
                    "budget": b,
                    "width": w["width"],
                    "depth": w["depth"],
                    "mask_ratio": w["mask_ratio"],
                    "params": w["params"],
                    "val_masked_r2": w["val_masked_r2"],
                }
            )
    counts = _counts(rows)
    columns = [
        "budget",
        "width",
        "depth",
        "heads",
        "mask_ratio",
        "params",
        "steps",
        "flops",
        "val_masked_r2",
        "outcome",
        "wins",
    ]
    title = (
        f"scale sweep {opts.name}: validation masked R^2 (fixed masks, higher is better) at fixed training "
        f"compute; {counts['finished']} of {counts['trials']} runs finished"
    )
    notes = [
        f"budget {w['budget']:.3g} FLOPs: width {w['width']} x depth {w['depth']}, mask ratio "
        f"{w['mask_ratio']} wins (val masked R^2 {w['val_masked_r2']:.4f}, {w['params']} params)"
        for w in winners
    ] + _error_notes(rows)
    out = _out_dir(opts)
    summary = {
        "name": opts.name,
        "kind": "scale",
        "counts": counts,
        "winners": winners,
        "parent_run_id": parent,
        "num_parcels": R,
        "global_batch": plan[0].global_batch,
    }
    files = _write_summary(out, "scaling", title, table_rows, columns, summary, notes)
    if any(_number(x["val_masked_r2"]) for x in table_rows):
        files.append(plots.scaling_figure(table_rows, out / "scaling.png"))
    _finish_parent(
        runs,
        parent,
        rows,
        files,
        {f"best_val_masked_r2_at_{w['budget']:.3g}".replace("+", ""): w["val_masked_r2"] for w in winners},
        {
            "winners": "; ".join(f"{w['budget']:.3g}: w{w['width']} d{w['depth']} m{w['mask_ratio']}" for w in winners)
            or "none"
        },
    )
    print("\n" + table(_show(table_rows), columns, title))
    for note in notes:
        print(note)
    print(f"figure and tables: {out}/scaling.png, scaling.md (.tsv, .json); MLflow parent run {parent}")
    if not winners:
        raise BrainLMError(f"no run of sweep {opts.name} finished; see the errors above and {out / 'scaling.md'}")
    return summary
