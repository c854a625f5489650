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
from dataclasses import dataclass, field

from brainlm.exceptions import BrainLMError, exit_code
from brainlm.registry_cli import add_registry
from brainlm.schema import Command, add_commands, add_version, from_flags, option


def _reconstruct(a: argparse.Namespace) -> None:
    from brainlm.eval.reconstruct import reconstruct
    from brainlm.masking import MASKINGS

    reconstruct(
        a.model, a.shards, a.out, a.split, a.mask_ratio, tuple(a.masking or MASKINGS), a.limit, a.device,
        a.source_shards or None, a.context, refit_prior=a.refit_prior,
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

        embed(a.model, a.shards, a.out, tuple(a.splits), a.device, a.random_weights)
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


@dataclass(kw_only=True)
class Analysis:
    """What every analysis reads and where it writes."""

    model: str
    """exported model folder, or models:/NAME@ALIAS from the registry"""
    shards: str
    """shard set (local folder or s3://...) with manifest.json"""
    out: str
    """folder for metrics.json and figures"""


@dataclass(kw_only=True)
class OnDevice(Analysis):
    device: str | None = None
    """cpu | cuda | cuda:N (default: CUDA when available); bf16 autocast on a GPU"""


@dataclass(kw_only=True)
class OnSplit(OnDevice):
    split: str = "test"
    """the split whose recordings are analysed"""


@dataclass(kw_only=True)
class Reconstruct(OnSplit):
    mask_ratio: float | None = None
    """default: the model's"""
    masking: list[str] | None = None
    """masking strategies (default random,tube,parcel,future)"""
    limit: int | None = None
    """evaluate at most this many windows"""
    source_shards: list[str] | None = None
    """shard sets the model was pretrained on (default: what its extra.json records); the baselines are fitted on them
    too (and on both) when they share the evaluated atlas"""
    context: str = "all"
    """other windows of its own recording each test window's +ctx baselines (and a context model) see: 0, K (the K
    nearest, never overlapping the window) or all"""
    refit_prior: bool = False
    """fit the decoder's prior on these shards' train split even when the model holds one for their atlas (a new
    cohort on an atlas seen in pretraining; on an unseen atlas it is always refitted)"""


@dataclass(kw_only=True)
class Embed(OnDevice):
    shards: str | None = None
    """a built shard set (local folder or s3://...) with manifest.json; or --inputs"""
    splits: list[str] = field(default_factory=lambda: ["train", "val", "test"])
    """with --shards: splits to embed"""
    inputs: list[str] | None = option(None, nargs="+")
    """instead of --shards: NIfTI / array files or folders (BIDS/fMRIPrep derivatives, NIfTI, parcel arrays),
    parcellated with the model's atlas, no shard build; writes embeddings.npz + embeddings.tsv"""
    atlas: str | None = None
    """with --inputs: the label image (or 4D maps) of the model's atlas, for NIfTI"""
    atlas_table: str | None = None
    """with --inputs: the atlas table (name, x, y, z[, network])"""
    kind: str = "auto"
    """with --inputs folders: auto | bids | nifti | arrays"""
    pooling: str = "cls"
    """with --inputs: cls | mean | latent_fc"""
    resample: bool = False
    """with --inputs: resample other TRs to the model's"""
    stride: int | None = None
    """with --inputs: step between windows (default the window)"""
    random_weights: bool = False
    """with --shards: the random-weights control's embeddings (same architecture and pooling, untrained)"""


@dataclass(kw_only=True)
class Fingerprint(OnSplit):
    split: str = "test"
    """the split(s) whose recordings are compared: test, or val,test"""
    label: str | None = None
    """a recording or subject column to decode (e.g. condition)"""
    folds: int = 5
    """cross-validation folds by subject for --label"""


@dataclass(kw_only=True)
class Networks(OnSplit):
    labels: str = "network"
    """the atlas label set to identify"""
    max_recordings: int = 60
    """recordings used, half reference"""
    k: int = 5
    """neighbours"""


@dataclass(kw_only=True)
class Attention(OnSplit):
    group_by: str = "condition"
    """metadata or phenotype to group by"""
    max_windows: int = 512
    """windows per group"""


@dataclass(kw_only=True)
class ImportRelease:
    src: str = option(positional=True)
    """the release's folder (config.json + weights)"""
    out: str
    """model folder to write"""
    atlas_table: str | None = None
    """the atlas the release was trained on (name, x, y, z[, network]), e.g. A424; required for the ViT-MAE releases"""


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
    for name, text in OWN_PARSERS.items():  # listed here, parsed by their own parsers (main)
        sub.add_parser(name, help=text, add_help=False)
    commands = [
        Command(
            "reconstruct",
            _reconstruct,
            "masked-patch R^2 on held-out recordings, beside baselines, with intervals",
            (Reconstruct,),
            "Masked-patch R^2 with fixed windows and seeded masks, per masking strategy, beside zero, parcel-mean, "
            "interpolation, ridge, spatio-temporal and adaptive Gaussian baselines (with the recording's other "
            "windows: ridge+ctx, adaptive+ctx), fitted on the data the model saw too; the margin over the best with "
            "paired bootstrap intervals over windows and subjects, a tie unless they exclude 0. On a GPU (--device) "
            "the ridge and adaptive imputations run there too.",
        ),
        Command(
            "benchmark",
            _benchmark,
            "K subject folds: build, pretrain and evaluate each, pooled with intervals",
            (BenchmarkConfig,),
            "The evaluation protocol end to end (docs/evaluation.md): every subject a test subject once, validation "
            "on subjects of its own, baselines fitted on the same data, paired bootstrap intervals over windows and "
            "subjects. Recipe overrides (--train.max_steps 600 ...) follow the flags.",
        ),
        Command(
            "embed",
            _embed,
            "deterministic CLS and mean-token embeddings per recording",
            (Embed,),
            "Embeddings per recording, averaged over its non-overlapping windows.",
        ),
        Command(
            "finetune",
            _finetune,
            "predict a phenotype; SVR, FC-ridge and probe baselines beside it",
            (Analysis, FinetuneConfig),
            "Fine-tune (or probe) an MLP head on the embedding to predict a phenotype, subject-level splits, mean +- "
            "std over seeds, baselines in the same table.",
        ),
        Command(
            "fingerprint",
            _fingerprint,
            "subject identification and label decoding from recording-level representations, beside FC",
            (Fingerprint,),
            "Each recording summarised from all its windows (CLS, mean token, latent connectivity; the same with "
            "random weights; FC): its subject identified by the nearest other recording, and a label decoded by "
            "logistic regression cross-validated by subject, with paired bootstrap intervals.",
        ),
        Command(
            "networks",
            _networks,
            "zero-shot functional network identification from CLS attention and tokens",
            (Networks,),
            "Per-recording parcel features (CLS attention, encoder tokens) classified by kNN fitted on other "
            "recordings and other parcels, beside raw time series, FC rows and coordinates.",
        ),
        Command(
            "perturb",
            _perturb,
            "in-silico perturbation from a source state to a target state",
            (Analysis, PerturbConfig),
            "Learn a sparse perturbation of the source recordings whose embedding matches the target state's; report "
            "where it concentrates.",
        ),
        Command(
            "attention",
            _attention,
            "CLS attention maps per parcel and group",
            (Attention,),
            "CLS attention per parcel averaged within groups, brain figures.",
        ),
        Command(
            "import-brainlm",
            _import_brainlm,
            "convert the released BrainLM weights (old_13M, vitmae_111M, vitmae_650M) into a model folder",
            (ImportRelease,),
            "Read a Hugging Face release folder (config.json + model.safetensors or pytorch_model.bin, read as "
            "weights only): BrainLMForPretraining (old_13M) or ViTMAEForPreTraining (vitmae_111M, vitmae_650M: "
            "needs --atlas-table, whose Y coordinates order the image rows), and write our model folder. Every key "
            "is mapped; unused ones are listed. The released weights are CC BY-NC-ND: convert them locally, never "
            "redistribute the result.",
        ),
    ]
    add_commands(sub, commands)["benchmark"].set_defaults(takes_overrides=True)
    add_registry(sub)
    return p


# The commands with parsers of their own: the shard build, pretraining (--config, --deepspeed and dotted overrides)
# and the sweeps; `python -m data_prep`, launcher/pretrain.py and launcher/tune.py run the same.
OWN_PARSERS = {
    "data": "build, inspect and push shard sets: synth | build | inspect | push (as python -m data_prep)",
    "pretrain": "pretrain with DeepSpeed in this process (as launcher/pretrain.py); --help lists every override",
    "tune": "Ray Tune sweeps: finetune | perturb | scale (as launcher/tune.py)",
}


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
