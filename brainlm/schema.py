"""Typed dataclasses as the schema of every entry point: the docstring under each field is its help, its annotation
its type, and one mapper turns a dataclass into flags (``add_flags``) and back (``from_flags``); ``option`` marks a
field positional or of several values. A command line is a table of ``Command``s (name, run, help, the dataclasses
of its flags) that ``add_commands`` turns into subparsers. The recipe parser (``brainlm.training.recipe``) and every
``brainlm`` command (the analyses, ``brainlm tune``, ``brainlm data``) go through it, so a field's name, type,
default and help are written once, in its dataclass.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import itertools
import textwrap
import types
import typing
from collections.abc import Callable
from typing import Any

from brainlm._version import __version__
from brainlm.exceptions import ConfigError


def add_version(p: argparse.ArgumentParser) -> None:
    """``--version``: the program and brainlm's version."""
    p.add_argument("--version", action="version", version=f"%(prog)s (brainlm {__version__})")


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass and of the dataclasses it extends (for --help)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs |= _own_field_docs(klass)
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs, body = {}, tree.body[0].body
    for node, nxt in itertools.pairwise(body):
        is_field = isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
        is_doc = isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)
        if is_field and is_doc:
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def types_of(annotation: Any) -> tuple[type, ...]:
    """``int | None`` -> (int, NoneType); ``list[str]`` -> (list,)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return tuple(t for a in typing.get_args(annotation) for t in types_of(a))
    return (origin or annotation,)


def coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` (from YAML or a flag) against a field's type; ints are accepted for floats."""
    allowed = types_of(annotation)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"`{key}` cannot be null")
    for t in allowed:
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is float and isinstance(value, str):  # YAML 1.1 reads "1e12" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is bool and isinstance(value, bool):
            return value
        if t is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if t is list and isinstance(value, list):
            return value
    names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    raise ConfigError(f"`{key}` expects {names}, got {value!r}")


def unknown_key(key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean `{close[0]}`?)" if close else ""
    return ConfigError(f"Unknown config key `{key}`{hint}; valid keys: {', '.join(valid)}")


def _item_type(annotation: Any) -> type:
    """``list[int] | None`` -> int; a bare ``list`` -> str."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    for t in typing.get_args(annotation) if union else (annotation,):
        if typing.get_origin(t) is list and typing.get_args(t):
            return typing.get_args(t)[0]
    return str


def _comma_list(item: type) -> Callable[[str], list]:
    """A flag's parser of comma-separated values, each of type ``item`` (argparse names it in a bad value's error)."""

    def parse(text: str) -> list:
        return [item(part.strip()) for part in text.split(",") if part.strip()]

    parse.__name__ = f"comma-separated {item.__name__}"
    return parse


def option(default: Any = dataclasses.MISSING, *, positional: bool = False, nargs: str | None = None) -> Any:
    """A dataclass field that says how its flag is written: ``positional`` (a bare argument, e.g. a path) and
    ``nargs`` ("+": one or more values after the flag, "?": an optional positional)."""
    return dataclasses.field(default=default, metadata={"positional": positional, "nargs": nargs})


def add_flags(
    p: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    skip: tuple[str, ...] = (),
) -> None:
    """One flag per dataclass field (``--field-name``), its docstring as help, its annotation as type; booleans get
    ``--x / --no-x``, lists a comma-separated value; fields without a default are required."""
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        text = docs.get(f.name, "").replace("%", "%%")  # argparse formats help with %
        kind = [t for t in types_of(hints[f.name]) if t is not type(None)] or [str]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        nargs = f.metadata.get("nargs")
        one = _item_type(hints[f.name]) if kind[0] is list else kind[0]  # the type of each value given
        if f.metadata.get("positional"):
            p.add_argument(f.name, nargs=nargs, type=one, help=text, **({} if required else {"default": default}))
        elif kind[0] is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        elif kind[0] is list and nargs:
            p.add_argument(flag, nargs=nargs, type=one, default=default, required=required, help=text)
        elif kind[0] is list:
            shown = f"; default {','.join(map(str, default))}" if default else ""
            p.add_argument(
                flag, type=_comma_list(one), default=default, required=required, help=f"{text} (comma-separated{shown})"
            )
        else:
            shown = "" if required or default is None else f" (default {default})"
            p.add_argument(flag, type=kind[0], default=default, required=required, help=f"{text}{shown}")


def from_flags(cls: type, args: argparse.Namespace, **values: Any) -> Any:
    """The dataclass from parsed flags: every field that has a flag, plus ``values`` (those win)."""
    kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**kwargs, **values})


@dataclasses.dataclass(frozen=True)
class Flags:
    """The flags of a dataclass's fields, less ``skip``, in an argument group when ``group`` titles one."""

    cls: type
    skip: tuple[str, ...] = ()
    group: str | None = None


@dataclasses.dataclass(frozen=True)
class Command:
    """A subcommand: its name, what runs it (given the parsed arguments), its one-line help, the dataclasses whose
    fields are its flags, and its description (the help by default)."""

    name: str
    run: Callable[..., Any]  # given the parsed arguments (and what a command passes on, e.g. recipe overrides)
    help: str
    flags: tuple[type | Flags, ...] = ()
    description: str | None = None


def add_commands(sub: argparse._SubParsersAction, commands: list[Command]) -> dict[str, argparse.ArgumentParser]:
    """A subparser per command, its flags from its dataclasses, ``func`` set to its run; returned by name, for what a
    table does not say (a default of one command's own)."""
    parsers = {}
    for c in commands:
        p = sub.add_parser(c.name, help=c.help, description=c.description or c.help)
        for spec in c.flags:
            spec = spec if isinstance(spec, Flags) else Flags(spec)
            add_flags(p.add_argument_group(spec.group) if spec.group else p, spec.cls, spec.skip)
        p.set_defaults(func=c.run)
        parsers[c.name] = p
    return parsers
