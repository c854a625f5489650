"""Search spaces: YAML files whose keys are config fields, translated into Ray Tune distributions and back into
the same config objects the CLI builds."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from ray import tune

from brainlm.exceptions import ConfigError
from brainlm.schema import coerce, types_of

ROOT = Path(__file__).resolve().parents[2]
# Recipes and search spaces ship inside the package (configs/ at the repository root links here).
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SPACES = CONFIGS / "tune"

# Fields a search space may not vary, and why: they define the task, the data or the trial's budget.
FINETUNE_FIXED = {
    "target": "it is the task; run one sweep per target",
    "task": "it is the task (regression or classification)",
    "transform": "the validation loss is measured in the transformed space, so trials would not be comparable",
    "epochs": "it is ASHA's budget per trial (max_t); set it with --epochs",
    "seeds": "every trial trains one seed; ASHA compares trials, not seeds",
    "min_subjects": "it decides which data is used, which the trials share",
    "device": "trials run where Ray puts them; ask for GPUs with --gpus-per-trial",
}
PERTURB_FIXED = {
    "source": "it is the question (the source state); set it with --source",
    "target": "it is the question (the target state); set it with --target",
    "split": "it decides which recordings are used, which the trials share",
    "max_windows": "it decides which windows are used, which the trials share",
    "top_fraction": "it only changes the report, not the optimisation",
    "device": "trials run where Ray puts them; ask for GPUs with --gpus-per-trial",
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
    allowed = types_of(annotation)
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
                dataclasses.replace(base, **{key: coerce(key, value, hints[key])})
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
        values[k] = coerce(k, v, hints[k])
    return dataclasses.replace(base, **values)
