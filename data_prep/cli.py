"""``python -m data_prep synth|build|inspect|push``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass

from brainlm.exceptions import exit_code
from brainlm.schema import Command, Flags, add_commands, add_version, field_docs, from_flags, option
from data_prep.build import BuildConfig
from data_prep.synth import SynthConfig


def _synth(args: argparse.Namespace) -> int:
    from data_prep.synth import SynthConfig, synth

    cfg = from_flags(SynthConfig, args)
    truth = synth(args.out, cfg)
    n = len(truth["recordings"])
    n_task = sum(r["condition"] == "task" for r in truth["recordings"].values())
    print(
        f"synthetic cohort: {cfg.subjects} subjects, {n} recordings ({n_task} task) of {cfg.timepoints} x "
        f"{cfg.tr} s -> {args.out}"
    )
    print(f"  build it: brainlm data build --inputs {args.out} --out SHARDS")
    if cfg.nifti:
        print(
            f"  NIfTI:    python -m data_prep build --inputs {args.out}/bids --atlas {args.out}/atlas_dseg.nii.gz "
            f"--atlas-table {args.out}/atlas.tsv --out SHARDS"
        )
    return 0


def _build(args: argparse.Namespace) -> int:
    from data_prep.build import build

    cfg = from_flags(BuildConfig, args, progress=args.progress and not args.quiet)
    manifest = build(cfg)
    if manifest is None:
        print(f"stage {cfg.stage} done")
        return 0
    from brainlm.data.shardset import ShardSet
    from brainlm.data.store import open_store
    from data_prep.inspect import summary

    print(summary(ShardSet(manifest, open_store(cfg.out).url)))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    """The manifest's summary and shards (or them as JSON), then their checksums verified: 1 if any fails."""
    from brainlm.data.shardset import ShardSet
    from data_prep.inspect import shard_lines, summary

    shard_set = ShardSet.open(args.dest)
    manifest = shard_set.manifest
    if args.json:
        shards = [{k: s[k] for k in ("url", "split", "samples", "bytes", "sha256")} for s in manifest.shards]
        print(json.dumps({"splits": manifest.splits, "shards": shards, "skipped": manifest.skipped}, indent=1))
    else:
        print(summary(shard_set))
        print("\n".join(["  shards", *shard_lines(manifest)]))
    if not args.verify:
        return 0
    problems = shard_set.verify()
    if problems:
        print(f"{len(problems)} shard(s) failed verification:", *problems, sep="\n  ")
        return 1
    print(f"  verified     all {len(manifest.shards)} shard checksums match")
    return 0


def _push(args: argparse.Namespace) -> int:
    from brainlm.data.store import copy_tree

    copy_tree(args.src, args.dest)
    print(f"copied {args.src} -> {args.dest}")
    return 0


@dataclass(kw_only=True)
class SynthFlags:
    out: str
    """output folder"""


@dataclass(kw_only=True)
class BuildFlags:
    quiet: bool = False
    """no progress bars (as --no-progress)"""


@dataclass(kw_only=True)
class InspectFlags:
    dest: str = option(positional=True)
    """a local folder or s3://bucket/prefix holding manifest.json"""
    verify: bool = True
    """check every shard's sha256"""
    json: bool = False
    """print the summary as JSON"""


@dataclass(kw_only=True)
class PushFlags:
    src: str = option(positional=True)
    """the folder (or s3://bucket/prefix) to copy"""
    dest: str = option(positional=True)
    """where to: a local folder or s3://bucket/prefix"""


def parser(prog: str = "brainlm data") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="fMRI -> parcels -> robust-scaled crops -> WebDataset shards + manifest.json",
    )
    add_version(p)
    sub = p.add_subparsers(dest="command", required=True)
    # The cohort's shape is set by flags; its effect sizes (fields without a docstring) are fixed ground truth.
    truth = tuple(f.name for f in dataclasses.fields(SynthConfig) if f.name not in field_docs(SynthConfig))
    commands = [
        Command(
            "synth",
            _synth,
            "write a synthetic cohort with known ground truth",
            (SynthFlags, Flags(SynthConfig, truth)),
            "Write a synthetic cohort (Seitzman 2018 atlas, TR 0.72 s) with ground truth.",
        ),
        Command(
            "build",
            _build,
            "turn inputs into shards + manifest.json",
            (BuildConfig, BuildFlags),
            "Parcellate, quality-check, scale (statistics from training subjects only), crop and shard. Resumable: a "
            "re-run skips work whose checksums match.",
        ),
        Command(
            "inspect",
            _inspect,
            "summarise a shard set and verify every shard's checksum",
            (InspectFlags,),
            "Print the manifest summary and check every shard's sha256.",
        ),
        Command(
            "push",
            _push,
            "copy a shard set (or any folder) to another store, e.g. to S3",
            (PushFlags,),
            "Copy every object under SRC to DEST (local folder or s3://bucket/prefix).",
        ),
    ]
    add_commands(sub, commands)
    return p


def main(argv: list[str] | None = None, prog: str = "brainlm data") -> int:
    args = parser(prog).parse_args(argv)
    return exit_code(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
