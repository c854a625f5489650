"""``python -m data_prep synth|build|inspect|push``."""

from __future__ import annotations

import argparse
import sys

from brainlm.exceptions import BrainLMError


def _synth(args: argparse.Namespace) -> int:
    from data_prep.synth import SynthConfig, synth

    cfg = SynthConfig(
        subjects=args.subjects,
        seed=args.seed,
        runs=args.runs,
        task_fraction=args.task_fraction,
        timepoints=args.timepoints,
        tr=args.tr,
        nifti=args.nifti,
        parcels=args.parcels,
    )
    truth = synth(args.out, cfg)
    n = len(truth["recordings"])
    n_task = sum(r["condition"] == "task" for r in truth["recordings"].values())
    print(
        f"synthetic cohort: {args.subjects} subjects, {n} recordings ({n_task} task) of {args.timepoints} x "
        f"{args.tr} s -> {args.out}"
    )
    print(f"  build it: python -m data_prep build --inputs {args.out} --out SHARDS")
    if args.nifti:
        print(
            f"  NIfTI:    python -m data_prep build --inputs {args.out}/bids --atlas {args.out}/atlas_dseg.nii.gz "
            f"--atlas-table {args.out}/atlas.tsv --out SHARDS"
        )
    return 0


def _build(args: argparse.Namespace) -> int:
    from data_prep.build import BuildConfig, build

    cfg = BuildConfig(
        inputs=args.inputs,
        out=args.out,
        kind=args.kind,
        atlas=args.atlas,
        atlas_table=args.atlas_table,
        tr=args.tr,
        resample=args.resample,
        resample_atlas=args.resample_atlas,
        confounds=args.confounds.split(",") if args.confounds else None,
        normalize=args.normalize,
        crop=args.crop,
        stride=args.stride,
        val_frac=args.val_frac,
        test_frac=args.test_frac,
        splits=args.splits,
        workers=args.workers,
        seed=args.seed,
        shard_mb=args.shard_mb,
        samples_per_shard=args.samples_per_shard,
        stage=args.stage,
        part=args.part,
        progress=not args.quiet,
    )
    manifest = build(cfg)
    if manifest is None:
        print(f"stage {args.stage} done")
        return 0
    from data_prep.inspect import summary

    print(summary(manifest, args.out))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from data_prep.inspect import inspect

    return inspect(args.dest, verify_checksums=not args.no_verify, as_json=args.json)


def _push(args: argparse.Namespace) -> int:
    from brainlm.data.store import copy_tree

    copy_tree(args.src, args.dest)
    print(f"copied {args.src} -> {args.dest}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="fMRI -> parcels -> robust-scaled crops -> WebDataset shards + manifest.json",
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "synth",
        help="write a synthetic cohort with known ground truth",
        description="Write a synthetic cohort (Seitzman 2018 atlas, TR 0.72 s) with ground truth.",
    )
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--subjects", type=int, default=40, help="number of subjects (default 40)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--runs", type=int, default=2, help="recordings per subject (default 2)")
    s.add_argument(
        "--task-fraction",
        type=float,
        default=0.25,
        help="share of recordings that are visual block-design task runs (default 0.25)",
    )
    s.add_argument("--timepoints", type=int, default=490, help="timepoints per recording (default 490)")
    s.add_argument("--tr", type=float, default=0.72, help="repetition time in seconds (default 0.72)")
    s.add_argument("--parcels", type=int, help="use a network-stratified subset of the 300 parcels (small tests)")
    s.add_argument(
        "--nifti",
        action="store_true",
        help="also write 4D NIfTI volumes (BIDS derivatives names) and an atlas label image",
    )
    s.set_defaults(func=_synth)

    b = sub.add_parser(
        "build",
        help="turn inputs into shards + manifest.json",
        description="Parcellate, quality-check, scale (statistics from training subjects only), "
        "crop and shard. Resumable: a re-run skips work whose checksums match.",
    )
    b.add_argument(
        "--inputs",
        required=True,
        help="folder: BIDS/fMRIPrep derivatives, 4D NIfTI files, or parcel arrays (.npy/.mat/.tsv/.csv, "
        "with recordings.tsv or BIDS-style names)",
    )
    b.add_argument("--out", required=True, help="destination: a local folder or s3://bucket/prefix")
    b.add_argument(
        "--kind",
        default="auto",
        choices=["auto", "bids", "nifti", "arrays"],
        help="input kind (default: detect)",
    )
    b.add_argument("--atlas", help="atlas image: 3D label image (NiftiLabelsMasker) or 4D maps (NiftiMapsMasker)")
    b.add_argument(
        "--atlas-table",
        help="TSV/CSV with name, x, y, z (MNI mm)[, network, index]; default INPUTS/atlas.tsv",
    )
    b.add_argument(
        "--tr",
        type=float,
        help="expected TR in seconds; recordings with another TR are skipped (default: the most common TR)",
    )
    b.add_argument("--resample", action="store_true", help="resample recordings to --tr instead of skipping them")
    b.add_argument(
        "--resample-atlas",
        action="store_true",
        help="let nilearn resample the atlas to each image instead of refusing a grid mismatch",
    )
    b.add_argument("--confounds", help="comma-separated fMRIPrep confound columns to regress out (BIDS inputs)")
    b.add_argument(
        "--normalize",
        default="demean",
        choices=["demean", "psc", "none"],
        help="per-recording normalisation before the robust scaling: remove each parcel's median (default), "
        "percent signal change (raw BOLD intensities), or none",
    )
    b.add_argument("--crop", type=int, default=200, help="timepoints per crop (default 200)")
    b.add_argument("--stride", type=int, help="step between crop starts (default crop // 2)")
    b.add_argument("--val-frac", type=float, default=0.1, help="share of subjects in val (default 0.1)")
    b.add_argument("--test-frac", type=float, default=0.1, help="share of subjects in test (default 0.1)")
    b.add_argument("--splits", help="TSV with subject and split (train/val/test): explicit assignment")
    b.add_argument("--workers", type=int, default=1, help="processes for parcellation and shard writing (default 1)")
    b.add_argument("--seed", type=int, default=0, help="seed of the split and shuffle (default 0)")
    b.add_argument("--shard-mb", type=float, default=256.0, help="target shard size in MiB (default 256)")
    b.add_argument("--samples-per-shard", type=int, help="crops per shard (overrides --shard-mb)")
    b.add_argument(
        "--stage",
        default="all",
        choices=["all", "parcellate", "plan", "shards", "manifest"],
        help="run one stage only (for clusters; default all)",
    )
    b.add_argument("--part", help="I/N: parcellate only every N-th recording from the I-th (an Indexed Job's pod)")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=_build)

    i = sub.add_parser(
        "inspect",
        help="summarise a shard set and verify every shard's checksum",
        description="Print the manifest summary and check every shard's sha256.",
    )
    i.add_argument("dest", help="a local folder or s3://bucket/prefix holding manifest.json")
    i.add_argument("--no-verify", action="store_true", help="skip checksum verification")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    i.set_defaults(func=_inspect)

    u = sub.add_parser(
        "push",
        help="copy a shard set (or any folder) to another store, e.g. to S3",
        description="Copy every object under SRC to DEST (local folder or s3://bucket/prefix).",
    )
    u.add_argument("src")
    u.add_argument("dest")
    u.set_defaults(func=_push)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except BrainLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
