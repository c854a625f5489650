"""The ``brainlm`` console command, the one front door: shard sets, pretraining, sweeps, every analysis, the registry.

brainlm data | pretrain | tune | reconstruct | embed | finetune | networks | perturb | attention | registry ...

The analyses are one subcommand each, a plain function; ``data``, ``pretrain`` and ``tune`` hand their arguments to
their own parsers (``data_prep.cli``, ``brainlm.training.launch``, ``brainlm.tuning.cli``), which the shims
``python -m data_prep``, ``launcher/pretrain.py`` and ``launcher/tune.py`` also call.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from brainlm.exceptions import BrainLMError, exit_code
from brainlm.registry_cli import add_registry
from brainlm.schema import add_flags, add_version, from_flags


def _reconstruct(a: argparse.Namespace) -> None:
    from brainlm.eval.reconstruct import reconstruct
    from brainlm.masking import MASKINGS

    strategies = tuple(m.strip() for m in a.masking.split(",") if m.strip()) if a.masking else MASKINGS
    sources = [s.strip() for s in a.source_shards.split(",") if s.strip()] if a.source_shards else None
    reconstruct(
        a.model, a.shards, a.out, a.split, a.mask_ratio, strategies, a.limit, a.device, sources, a.context,
        refit_prior=a.refit_prior,
    )  # fmt: skip


def _benchmark(a: argparse.Namespace) -> None:
    from brainlm.benchmark import BenchmarkConfig, benchmark

    benchmark(from_flags(BenchmarkConfig, a), a.overrides)


def _embed(a: argparse.Namespace) -> None:
    if bool(a.shards) == bool(a.inputs):
        given = "both were given" if a.shards else "neither was given"
        raise BrainLMError(
            f"brainlm embed: give --shards (a built shard set) or --inputs (files or a folder), one of them; {given}"
        )
    if a.shards:
        from brainlm.eval.embed import embed

        embed(a.model, a.shards, a.out, tuple(a.splits.split(",")), a.device, a.random_weights)
        return
    from brainlm.api import embed_files, load

    model = load(a.model, a.device)
    table = embed_files(model, a.inputs, a.atlas, a.atlas_table, a.kind, a.pooling, a.resample, a.stride)
    files = table.save(a.out)
    print(
        f"embedded {len(table.ids)} recording(s) ({table.values.shape[1]} values each, pooling {a.pooling}) -> "
        f"{', '.join(str(f) for f in files)}"
    )
    for s in table.skipped:
        print(f"  skipped {s['recording']}: {s['reason']}", file=sys.stderr)


def _fingerprint(a: argparse.Namespace) -> None:
    from brainlm.eval.fingerprint import fingerprint

    fingerprint(a.model, a.shards, a.out, a.split, a.label, a.folds, a.device)


def _finetune(a: argparse.Namespace) -> None:
    from brainlm.eval.finetune import FinetuneConfig, finetune

    finetune(a.model, a.shards, a.out, from_flags(FinetuneConfig, a))


def _networks(a: argparse.Namespace) -> None:
    from brainlm.eval.networks import networks

    networks(a.model, a.shards, a.out, a.split, a.labels, a.max_recordings, a.k, device=a.device)


def _perturb(a: argparse.Namespace) -> None:
    from brainlm.eval.perturb import PerturbConfig, perturb

    perturb(a.model, a.shards, a.out, from_flags(PerturbConfig, a))


def _attention(a: argparse.Namespace) -> None:
    from brainlm.eval.attention import attention

    attention(a.model, a.shards, a.out, a.group_by, a.split, a.max_windows, a.device)


def _import_brainlm(a: argparse.Namespace) -> None:

    from brainlm.model.convert_vitmae import convert_release
    from brainlm.recordings.atlas import atlas_from_table

    atlas = atlas_from_table(a.atlas_table)[0] if a.atlas_table else None
    conv = convert_release(a.src, atlas.coords() if atlas else None)
    extra: dict = {"source": conv.source, "notes": conv.notes}
    if atlas is not None:
        R = conv.model.config.num_parcels
        if atlas.num_parcels != R:
            raise BrainLMError(
                f"--atlas-table {a.atlas_table} has {atlas.num_parcels} parcels but the release was trained on {R}; "
                "give the table of the atlas it was trained on (A424 for the paper's models)"
            )
        extra["atlas"] = dataclasses.asdict(atlas)
    conv.model.save_pretrained(a.out, extra=extra)
    c = conv.model.config
    patches = (
        f"patches of {c.patch_size}"
        if conv.source["format"] == "BrainLMForPretraining"
        else (f"a {c.image_size} x {c.image_size} image in patches of {c.patch_size} x {c.patch_size}")
    )
    print(
        f"imported {a.src} -> {a.out}: {conv.source['params_millions']}M parameters ({conv.source['format']}), "
        f"{c.num_parcels} parcels x {c.num_timepoints} timepoints, {patches}"
    )
    print("dropped (not needed: unused by the release's forward, or recomputed and checked):")
    for key, why in conv.dropped.items():
        print(f"  {key}: {why}")
    print("what the release does not say:")
    for note in conv.notes:
        print(f"  - {note}")
    if not a.atlas_table:
        print("  - No atlas given: pass coordinates yourself, or re-run with --atlas-table (e.g. A424's).")


def _io(p: argparse.ArgumentParser, shards_required: bool = True, device: bool = True) -> None:
    p.add_argument("--model", required=True, help="exported model folder, or models:/NAME@ALIAS from the registry")
    p.add_argument("--shards", required=shards_required, help="shard set (local folder or s3://...) with manifest.json")
    p.add_argument("--out", required=True, help="folder for metrics.json and figures")
    if device:
        p.add_argument("--device", help="cpu | cuda | cuda:N (default: CUDA when available); bf16 autocast on a GPU")


def parser() -> argparse.ArgumentParser:
    from brainlm.benchmark import BenchmarkConfig
    from brainlm.eval.finetune import FinetuneConfig
    from brainlm.eval.perturb import PerturbConfig

    p = argparse.ArgumentParser(
        prog="brainlm",
        epilog='Python: import brainlm; brainlm.load(...) (see the README\'s "Use a pretrained model").',
        description="Analyses with pretrained BrainLM models. Each writes "
        "metrics.json and figures into --out and prints a table with baselines beside it.",
    )
    add_version(p)
    p.add_argument(
        "--threads",
        type=int,
        help="CPU threads (default: the free cores; BRAINLM_THREADS or OMP_NUM_THREADS set it too); before the command "
        "(for pretrain it is passed on as BRAINLM_THREADS, which its ranks read)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser(
        "reconstruct",
        help="masked-patch R^2 on held-out recordings, beside baselines, with intervals",
        description="Masked-patch R^2 with fixed windows and seeded masks, per masking strategy, beside zero, "
        "parcel-mean, interpolation, ridge, spatio-temporal and adaptive Gaussian baselines (with the recording's "
        "other windows: ridge+ctx, adaptive+ctx), fitted on the data the model saw too; the margin over the best "
        "with paired bootstrap intervals over windows and subjects, a tie unless they exclude 0.",
    )
    _io(r)
    r.add_argument("--split", default="test", help="split to evaluate (default test)")
    r.add_argument("--mask-ratio", type=float, help="default: the model's")
    r.add_argument("--masking", help="comma-separated strategies (default random,tube,parcel,future)")
    r.add_argument("--limit", type=int, help="evaluate at most this many windows")
    r.add_argument(
        "--source-shards",
        help="comma-separated shard sets the model was pretrained on (default: what its extra.json records); the "
        "baselines are fitted on them too (and on both) when they share the evaluated atlas",
    )
    r.add_argument(
        "--context",
        default="all",
        help="other windows of its own recording each test window's +ctx baselines (and a context model) see: "
        "0, K (the K nearest, never overlapping the window) or all (default)",
    )
    r.add_argument(
        "--refit-prior",
        action="store_true",
        help="fit the decoder's prior on these shards' train split even when the model holds one for their atlas "
        "(a new cohort on an atlas seen in pretraining; on an unseen atlas it is always refitted)",
    )
    r.set_defaults(func=_reconstruct)

    m = sub.add_parser(
        "benchmark",
        help="K subject folds: build, pretrain and evaluate each, pooled with intervals",
        description="The evaluation protocol end to end (docs/evaluation.md): every subject a test subject once, "
        "validation on subjects of its own, baselines fitted on the same data, paired bootstrap intervals over "
        "windows and subjects. Recipe overrides (--train.max_steps 600 ...) follow the flags.",
    )
    add_flags(m, BenchmarkConfig)
    m.set_defaults(func=_benchmark, takes_overrides=True)

    sub.add_parser(
        "data",
        help="build, inspect and push shard sets: synth | build | inspect | push (as python -m data_prep)",
        add_help=False,
    )
    sub.add_parser(
        "pretrain",
        help="pretrain with DeepSpeed in this process (as launcher/pretrain.py); --help lists every override",
        add_help=False,
    )
    sub.add_parser(
        "tune",
        help="Ray Tune sweeps: finetune | perturb | scale (as launcher/tune.py)",
        add_help=False,
    )

    e = sub.add_parser(
        "embed",
        help="deterministic CLS and mean-token embeddings per recording",
        description="Embeddings per recording, averaged over its non-overlapping windows.",
    )
    _io(e, shards_required=False)
    e.add_argument("--splits", default="train,val,test", help="with --shards: splits to embed (default train,val,test)")
    e.add_argument(
        "--inputs",
        nargs="+",
        help="instead of --shards: NIfTI / array files or folders (BIDS/fMRIPrep derivatives, NIfTI, parcel arrays), "
        "parcellated with the model's atlas, no shard build; writes embeddings.npz + embeddings.tsv",
    )
    e.add_argument("--atlas", help="with --inputs: the label image (or 4D maps) of the model's atlas, for NIfTI")
    e.add_argument("--atlas-table", help="with --inputs: the atlas table (name, x, y, z[, network])")
    e.add_argument("--kind", default="auto", help="with --inputs folders: auto | bids | nifti | arrays")
    e.add_argument("--pooling", default="cls", help="with --inputs: cls | mean | latent_fc (default cls)")
    e.add_argument("--resample", action="store_true", help="with --inputs: resample other TRs to the model's")
    e.add_argument("--stride", type=int, help="with --inputs: step between windows (default the window)")
    e.add_argument(
        "--random-weights",
        action="store_true",
        help="with --shards: the random-weights control's embeddings (same architecture and pooling, untrained)",
    )
    e.set_defaults(func=_embed)

    f = sub.add_parser(
        "finetune",
        help="predict a phenotype; SVR, FC-ridge and probe baselines beside it",
        description="Fine-tune (or probe) an MLP head on the embedding to predict a phenotype, "
        "subject-level splits, mean +- std over seeds, baselines in the same table.",
    )
    _io(f, device=False)
    add_flags(f, FinetuneConfig)
    f.set_defaults(func=_finetune)

    fp = sub.add_parser(
        "fingerprint",
        help="subject identification and label decoding from recording-level representations, beside FC",
        description="Each recording summarised from all its windows (CLS, mean token, latent connectivity; the same "
        "with random weights; FC): its subject identified by the nearest other recording, and a label decoded by "
        "logistic regression cross-validated by subject, with paired bootstrap intervals.",
    )
    _io(fp)
    fp.add_argument(
        "--split", default="test", help="split(s) whose recordings are compared: test (default), or val,test"
    )
    fp.add_argument("--label", help="a recording or subject column to decode (e.g. condition)")
    fp.add_argument("--folds", type=int, default=5, help="cross-validation folds by subject for --label (default 5)")
    fp.set_defaults(func=_fingerprint)

    n = sub.add_parser(
        "networks",
        help="zero-shot functional network identification from CLS attention and tokens",
        description="Per-recording parcel features (CLS attention, encoder tokens) classified by kNN fitted "
        "on other recordings and other parcels, beside raw time series, FC rows and coordinates.",
    )
    _io(n)
    n.add_argument("--labels", default="network", help="the atlas label set to identify (default network)")
    n.add_argument("--split", default="test", help="split whose recordings give the features (default test)")
    n.add_argument("--max-recordings", type=int, default=60, help="recordings used, half reference (default 60)")
    n.add_argument("--k", type=int, default=5, help="neighbours (default 5)")
    n.set_defaults(func=_networks)

    b = sub.add_parser(
        "perturb",
        help="in-silico perturbation from a source state to a target state",
        description="Learn a sparse perturbation of the source recordings whose embedding "
        "matches the target state's; report where it concentrates.",
    )
    _io(b, device=False)
    add_flags(b, PerturbConfig)
    b.set_defaults(func=_perturb)

    t = sub.add_parser(
        "attention",
        help="CLS attention maps per parcel and group",
        description="CLS attention per parcel averaged within groups, brain figures.",
    )
    _io(t)
    t.add_argument("--group-by", default="condition", help="metadata or phenotype to group by (default condition)")
    t.add_argument("--split", default="test", help="split (default test)")
    t.add_argument("--max-windows", type=int, default=512, help="windows per group (default 512)")
    t.set_defaults(func=_attention)

    i = sub.add_parser(
        "import-brainlm",
        help="convert the released BrainLM weights (old_13M, vitmae_111M, vitmae_650M) into a model folder",
        description="Read a Hugging Face release folder (config.json + model.safetensors or pytorch_model.bin, read "
        "as weights only): BrainLMForPretraining (old_13M) or ViTMAEForPreTraining (vitmae_111M, vitmae_650M: needs "
        "--atlas-table, whose Y coordinates order the image rows), and write our model folder. Every key is mapped; "
        "unused ones are listed. The released weights are CC BY-NC-ND: convert them locally, never redistribute the "
        "result.",
    )
    i.add_argument("src", help="the release's folder (config.json + weights)")
    i.add_argument("--out", required=True, help="model folder to write")
    i.add_argument(
        "--atlas-table",
        help="the atlas the release was trained on (name, x, y, z[, network]), e.g. A424; required for the ViT-MAE "
        "releases",
    )
    i.set_defaults(func=_import_brainlm)

    add_registry(sub)
    return p


def _leading_threads(argv: list[str]) -> list[str]:
    """``brainlm --threads N pretrain ...``: pretraining has a parser of its own and its ranks read the thread count
    from the environment, so a leading ``--threads`` is set there; the rest returned. ``data`` and ``tune`` size
    their work otherwise (``--workers``, ``--cpus-per-trial``): said, not ignored."""
    head = argv[0] if argv else ""
    if head.startswith("--threads="):
        value, rest = head.partition("=")[2], argv[1:]
    elif head == "--threads" and len(argv) > 1:
        value, rest = argv[1], argv[2:]
    else:
        return argv
    if rest[:1] in (["data"], ["tune"]):
        own = (
            "data build --workers N (processes)" if rest[0] == "data" else "tune ... --cpus-per-trial N (each trial's)"
        )
        raise SystemExit(f"brainlm: --threads does not apply to `{rest[0]}`; use brainlm {own}")
    if rest[:1] != ["pretrain"]:
        return argv  # the main parser reads it
    if not value.isdigit() or int(value) < 1:
        raise SystemExit(f"brainlm: --threads expects a whole number of at least 1, got {value!r}")
    from brainlm import threads

    os.environ[threads.ENV] = value
    return rest


def main(argv: list[str] | None = None) -> int:
    argv = _leading_threads(sys.argv[1:] if argv is None else list(argv))
    # Commands with parsers of their own, run as they are: the shard build, pretraining (--config, --deepspeed and
    # dotted overrides) and the sweeps. `python -m data_prep`, launcher/pretrain.py and launcher/tune.py are the same.
    if argv[:1] == ["data"]:
        from data_prep.cli import main as data

        return data(argv[1:], prog="brainlm data")
    if argv[:1] == ["pretrain"]:
        from brainlm.training.launch import main as pretrain

        return pretrain(argv[1:], prog="brainlm pretrain")
    if argv[:1] == ["tune"]:
        from brainlm.tuning.cli import main as tune

        return tune(argv[1:], prog="brainlm tune")
    p = parser()
    args, extra = p.parse_known_args(argv)
    if extra and not getattr(args, "takes_overrides", False):
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    from brainlm import threads

    threads.apply(1, args.threads)
    return exit_code(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
