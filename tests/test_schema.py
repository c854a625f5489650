"""The command line from dataclasses: a field's name, type, default and docstring are its flag, and every command of
``brainlm``, ``brainlm data`` and ``brainlm tune`` is built that way."""

from __future__ import annotations

import argparse
import re
import shlex
from dataclasses import dataclass, field

import pytest

from brainlm.schema import Command, Flags, add_commands, from_flags, option


@dataclass(kw_only=True)
class Base:
    model: str
    """the model"""
    device: str | None = None
    """where to run"""


@dataclass(kw_only=True)
class Child(Base):
    src: str = option(positional=True)
    """a path"""
    inputs: list[str] | None = option(None, nargs="+")
    """several files"""
    splits: list[str] = field(default_factory=lambda: ["train", "test"])
    """splits"""
    refit: bool = False
    """refit it"""
    k: int = 5
    """neighbours"""
    sizes: list[int] | None = option(None, nargs="+")
    """several numbers"""
    ranks: list[int] = field(default_factory=lambda: [1, 2])
    """comma-separated numbers"""
    secret: int = 1
    """skipped"""


RAN: list[argparse.Namespace] = []


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="x")
    add_commands(
        p.add_subparsers(dest="command", required=True),
        [Command("go", RAN.append, "go somewhere", (Flags(Child, skip=("secret",), group="things"),))],
    )
    return p


def test_a_dataclass_becomes_flags_and_the_flags_become_it_again():
    p = _parser()
    argv = "go in/ --model m --inputs a.nii b.nii --splits val,test --refit --sizes 3 4 --ranks 5,6"
    c = from_flags(Child, p.parse_args(shlex.split(argv)))
    assert (c.model, c.src, c.inputs, c.splits, c.refit, c.k, c.sizes, c.ranks, c.secret) == (
        "m", "in/", ["a.nii", "b.nii"], ["val", "test"], True, 5, [3, 4], [5, 6], 1
    )  # fmt: skip
    a = p.parse_args(["go", "in/", "--model", "m"])
    a.func(a)  # the command's run
    assert RAN[-1] is a
    defaults = from_flags(Child, p.parse_args(["go", "in/", "--model", "m", "--no-refit"]))
    assert (defaults.inputs, defaults.splits, defaults.refit, defaults.device, defaults.ranks) == (
        None, ["train", "test"], False, None, [1, 2]
    )  # fmt: skip
    helps = p._subparsers._group_actions[0].choices["go"].format_help()
    for text in ("the model", "where to run", "a path", "several files", "(comma-separated; default train,test)",
                 "neighbours (default 5)", "things:"):  # fmt: skip
        assert text in " ".join(helps.split())  # inherited fields keep their docstrings
    assert "--secret" not in helps


@pytest.mark.parametrize(
    "argv",
    [["go", "--model", "m"], ["go", "in/"], ["go", "in/", "--model", "m", "--k", "x"],
     ["go", "in/", "--model", "m", "--sizes", "3", "x"], ["go", "in/", "--model", "m", "--ranks", "3,x"]],
)  # fmt: skip
def test_a_missing_or_ill_typed_flag_is_refused(argv, capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(argv)
    assert "error:" in capsys.readouterr().err


def _own_words(text: str | None) -> str:
    """A flag's help less what add_flags appends to any field's (its default, comma-separated)."""
    return re.sub(r"\s*\((default [^)]*|comma-separated[^)]*)\)$", "", text or "").strip()


def test_every_flag_of_every_command_has_its_help():
    """Each command's flags come from documented fields: a field without a docstring would show a flag without help."""
    from brainlm.cli import parser as front
    from brainlm.tuning.cli import parser as tune
    from data_prep.cli import parser as data

    def commands(p: argparse.ArgumentParser):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from (
                        ((f"{name} {n}", s) for n, s in commands(sub))
                        if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions)
                        else [(name, sub)]
                    )

    missing = []
    for root in (front(), tune(), data()):
        for name, sub in commands(root):
            if not sub.add_help:
                continue  # data / pretrain / tune: listed by the front door, parsed by their own parsers
            missing += [f"{name} {a.option_strings or a.dest}" for a in sub._actions if not _own_words(a.help)]
    assert not missing, f"flags without help: {missing}"
