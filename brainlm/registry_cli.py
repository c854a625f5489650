"""``brainlm registry list|show|promote|download``: the MLflow model registry from the command line (the store is
MLFLOW_TRACKING_URI). ``brainlm.cli`` adds these commands (``add_registry``); mlflow is imported when one runs."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from brainlm.exceptions import BrainLMError
from brainlm.schema import Command, add_commands, option


def _registry_store() -> None:
    from brainlm.tracking.env import tracking_store

    print(f"MLflow store: {tracking_store()}", file=sys.stderr, flush=True)


def _registry_list(a: argparse.Namespace) -> None:
    from brainlm.eval.common import table
    from brainlm.tracking.registry import list_models, list_versions

    _registry_store()
    if a.name:
        rows = [
            r
            | {
                "aliases": ", ".join(r["aliases"]),
                "run_id": r["run_id"][:12],
                "manifest_sha256": r["manifest_sha256"][:12],
            }
            for r in list_versions(a.name)
        ]
        columns = ["version", "aliases", "created", "run_id", "manifest_sha256", "from"]
        print(table(rows, columns, f"{a.name}: versions"))
        return
    rows = [r | {"aliases": ", ".join(f"{k} -> {v}" for k, v in r["aliases"].items())} for r in list_models()]
    if not rows:
        print("no registered models")
        return
    print(table(rows, ["name", "versions", "newest", "aliases", "updated"], "registered models"))


def _registry_show(a: argparse.Namespace) -> None:
    import json

    from brainlm.tracking.registry import describe

    if a.version and a.alias:
        raise BrainLMError(f"registry show: give --version or --alias, not both (got {a.version} and {a.alias})")
    _registry_store()
    info = describe(a.name, a.version, a.alias)
    if a.json:
        print(json.dumps(info, indent=1, default=str))
        return
    print(
        f"{info['name']} version {info['version']}  aliases: {', '.join(info['aliases']) or '-'}  "
        f"created {info['created']}"
    )
    print(
        f"  run {info['run_id']} ({info.get('run_name', '?')})"
        + (f" in sweep {info['sweep'].get('run_name', '')} ({info['sweep']['run_id']})" if info.get("sweep") else "")
    )
    print(f"  uri models:/{info['name']}/{info['version']}  source {info['source']}")
    for title in ("tags", "metrics", "params"):
        if info[title]:
            print(f"{title}{' (lineage)' if title == 'tags' else ''}:")
            width = max(len(k) for k in info[title])
            for k, v in info[title].items():
                print(f"  {k.ljust(width)}  {f'{v:.6g}' if isinstance(v, float) else v}")


def _registry_promote(a: argparse.Namespace) -> None:
    from brainlm.tracking.registry import promote

    _registry_store()
    before = promote(a.name, a.version, a.alias)
    was = f"(was version {before})" if before is not None else "(a new alias)"
    print(f"{a.name}@{a.alias} -> version {a.version} {was}; use it as models:/{a.name}@{a.alias}")


def _registry_download(a: argparse.Namespace) -> None:
    from brainlm.tracking.registry import download

    _registry_store()
    out = download(a.uri, a.out)
    print(f"{a.uri} -> {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")


@dataclass(kw_only=True)
class ListFlags:
    name: str | None = option(None, positional=True, nargs="?")
    """list this model's versions"""


@dataclass(kw_only=True)
class Named:
    name: str = option(positional=True)
    """registered model name"""


@dataclass(kw_only=True)
class ShowFlags(Named):
    version: str | None = None
    """version number or latest (default: the newest; or --alias)"""
    alias: str | None = None
    """alias, e.g. champion"""
    json: bool = False
    """print JSON"""


@dataclass(kw_only=True)
class PromoteFlags(Named):
    version: str = option(positional=True)
    """version number"""
    alias: str = option(positional=True)
    """alias to move or create (not latest: MLflow reserves it)"""


@dataclass(kw_only=True)
class DownloadFlags:
    uri: str = option(positional=True)
    """models:/NAME@ALIAS or models:/NAME/VERSION"""
    out: str
    """folder for model.safetensors, config.json, ..."""


def add_registry(sub: argparse._SubParsersAction) -> None:
    """The ``registry`` command and its actions, on the front door's subparsers."""
    g = sub.add_parser(
        "registry",
        help="registered models: list, show, promote (move an alias), download",
        description="The MLflow model registry (the store is MLFLOW_TRACKING_URI). Every command "
        "that takes --model accepts models:/NAME@ALIAS and models:/NAME/VERSION.",
    )
    commands = [
        Command("list", _registry_list, "registered models with their versions and aliases (or one model's versions)",
                (ListFlags,)),
        Command("show", _registry_show, "one version: aliases, lineage tags, its run's params and metrics",
                (ShowFlags,)),
        Command("promote", _registry_promote, "point an alias at a version (e.g. champion -> 3)", (PromoteFlags,)),
        Command("download", _registry_download, "fetch a model version into a folder", (DownloadFlags,)),
    ]  # fmt: skip
    add_commands(g.add_subparsers(dest="action", required=True), commands)
