"""Ray Tune sweeps: fine-tuning, perturbation and model shape at a fixed compute budget (``brainlm tune``).

    brainlm tune finetune --model models:/brainlm-debug@current --shards demo/shards --target age \\
        [--samples 8] [--space configs/tune/finetune.yaml] [--epochs 20] [--cpus-per-trial 1] [--gpus-per-trial 0]
    brainlm tune perturb --model models:/brainlm-debug@current --shards demo/shards \\
        --source condition=rest --target condition=task [--space configs/tune/perturb.yaml] [--theta-budget 0.1]
    brainlm tune scale --shards demo/shards --widths 32,64 --depths 1,2 --mask-ratios 0.5,0.75 \\
        --budget 1e12,3e12 [--recipe configs/pretrain/debug.yaml] [--model.X VALUE ...]

Locally a Ray instance starts on loopback with this machine's CPUs (--num-cpus); on a cluster pass
--address auto (on a Ray node) or ray://HEAD:10001, --storage s3://bucket/prefix and MLFLOW_TRACKING_URI.
An interrupted sweep continues with the same command plus --resume --name NAME.

Parses, builds the configs, and calls brainlm.tuning (the tests call the same functions); ``launcher/tune.py`` is a
shim over this module. The default spaces and recipe are the package's configs/ (a checkout's configs/ links there).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from brainlm.eval.finetune import FinetuneConfig
from brainlm.eval.perturb import PerturbConfig
from brainlm.exceptions import ConfigError, exit_code
from brainlm.schema import add_flags, add_version, from_flags
from brainlm.training.recipe import parse_overrides

CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # shipped with the package (configs/ in a checkout)


def _sweep_flags(p: argparse.ArgumentParser, asha: bool = True) -> None:
    g = p.add_argument_group("sweep")
    if asha:
        g.add_argument("--samples", type=int, default=8, help="trials drawn from the space (x every grid axis)")
        g.add_argument(
            "--grace-period",
            type=int,
            help="ASHA: least progress before a trial can be stopped (default 1 epoch; 40 perturbation steps)",
        )
        g.add_argument("--reduction-factor", type=int, default=3, help="ASHA: keep the best 1/N at each rung")
    g.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial (default 1)")
    g.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs per trial (default 0)")
    g.add_argument(
        "--address",
        help="a Ray cluster: auto (on a node of it) or ray://HEAD:10001 (default: start a local Ray on 127.0.0.1)",
    )
    g.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all of this machine's)")
    g.add_argument(
        "--storage",
        default="runs/ray",
        help="where Ray keeps trial results and checkpoints: a folder or s3://bucket/prefix (default runs/ray)",
    )
    g.add_argument(
        "--name",
        help="the sweep's name: its folder under --storage and its MLflow parent run (default KIND[-TARGET]-DATE-TIME)",
    )
    g.add_argument("--resume", action="store_true", help="continue the interrupted sweep --name under --storage")
    g.add_argument("--retry-errored", action="store_true", help="with --resume: run errored trials again")
    g.add_argument(
        "--experiment",
        default="brainlm-sweeps",
        help="MLflow experiment (default brainlm-sweeps); the store is MLFLOW_TRACKING_URI",
    )
    g.add_argument("--out", help="folder for the summary table and figures (default runs/sweeps/NAME)")


def _options(a: argparse.Namespace):
    from brainlm.tuning import SweepOptions

    return SweepOptions(
        samples=getattr(a, "samples", 1),
        cpus_per_trial=a.cpus_per_trial,
        gpus_per_trial=a.gpus_per_trial,
        address=a.address,
        num_cpus=a.num_cpus,
        storage=a.storage,
        name=a.name,
        resume=a.resume,
        retry_errored=a.retry_errored,
        experiment=a.experiment,
        out=a.out,
        grace_period=getattr(a, "grace_period", None),
        reduction_factor=getattr(a, "reduction_factor", 3),
    )


def _list(text: str, kind: type, flag: str) -> list:
    try:
        return [kind(float(x)) if kind is int else kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} expects comma-separated {kind.__name__}s (e.g. 32,64), got {text!r}") from None


def _model_space_flags(p: argparse.ArgumentParser, kind: str, fields: str) -> None:
    """The pretrained model, its shard set and the search space: what a finetune or perturb sweep starts from."""
    p.add_argument("--model", required=True, help="pretrained model: a folder or models:/NAME@ALIAS")
    p.add_argument("--shards", required=True, help="shard set (folder or s3://...) with manifest.json")
    p.add_argument(
        "--space",
        default=str(CONFIGS / "tune" / f"{kind}.yaml"),
        help=f"search space YAML (keys: {fields} fields; default configs/tune/{kind}.yaml)",
    )


def parser(prog: str = "brainlm tune") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version(p)
    sub = p.add_subparsers(dest="kind", required=True)

    f = sub.add_parser(
        "finetune",
        help="ASHA over fine-tuning knobs; registers the best model",
        description="ASHA over the FinetuneConfig knobs of --space, early stopping on the per-epoch "
        "validation loss. The flags below set everything the space does not vary. The best trial's "
        "model is registered as brainlm-finetuned-TARGET with alias champion.",
    )
    _model_space_flags(f, "finetune", "FinetuneConfig")
    f.add_argument("--register-as", help="registered model name (default brainlm-finetuned-TARGET)")
    f.add_argument("--alias", default="champion", help="alias set on the best model (default champion)")
    add_flags(
        f.add_argument_group("fine-tuning (fixed for every trial unless the space varies it)"),
        FinetuneConfig,
        skip=("seeds", "device"),
    )
    _sweep_flags(f)

    b = sub.add_parser(
        "perturb",
        help="ASHA over perturbation knobs, scored by reach within a sparsity budget",
        description="ASHA over the PerturbConfig knobs of --space. score = reached - max(0, "
        "mean|theta| - budget) / budget: the share of the source-to-target embedding distance closed, "
        "less the relative excess of the perturbation over --theta-budget. Higher is better.",
    )
    _model_space_flags(b, "perturb", "PerturbConfig")
    b.add_argument(
        "--theta-budget",
        type=float,
        default=0.1,
        help="sparsity budget: mean |theta| (robust-scaled units) allowed without penalty (default 0.1)",
    )
    add_flags(
        b.add_argument_group("perturbation (fixed for every trial unless the space varies it)"),
        PerturbConfig,
        skip=("device",),
    )
    _sweep_flags(b)

    s = sub.add_parser(
        "scale",
        help="short pretraining runs over width x depth x mask ratio at fixed compute",
        description="One pretraining run per width x depth x mask ratio x budget, each for budget / "
        "(FLOPs per sample x global batch) steps; a figure and tables of validation masked R^2 against "
        "compute and parameters. Further --section.key VALUE flags override the recipe "
        "(brainlm pretrain --help lists them).",
    )
    s.add_argument("--shards", required=True, help="shard set (folder or s3://...) with manifest.json")
    s.add_argument("--widths", required=True, help="encoder widths, comma-separated (e.g. 32,64)")
    s.add_argument("--depths", required=True, help="encoder layers, comma-separated (e.g. 1,2)")
    s.add_argument("--mask-ratios", default="0.75", help="mask ratios, comma-separated (default 0.75)")
    s.add_argument("--budget", required=True, help="training FLOPs per run, comma-separated for several (e.g. 1e12)")
    s.add_argument(
        "--recipe",
        default=str(CONFIGS / "pretrain" / "debug.yaml"),
        help="pretraining recipe the shapes vary (default configs/pretrain/debug.yaml)",
    )
    s.add_argument("--deepspeed", default="ds_config.json", help="DeepSpeed JSON (default ds_config.json)")
    s.add_argument("--head-dim", type=int, default=32, help="heads = max(1, width // head-dim) (default 32)")
    s.add_argument("--val-points", type=int, default=4, help="validations per run (default 4, the last at the end)")
    _sweep_flags(s, asha=False)
    return p


def main(argv: list[str] | None = None, prog: str = "brainlm tune") -> int:
    args, rest = parser(prog).parse_known_args(argv)
    return exit_code(lambda: _run(args, rest))


def _run(args: argparse.Namespace, rest: list[str]) -> None:
    from brainlm import tuning  # ray: after parsing, so --help stays quick

    if rest and args.kind != "scale":
        raise ConfigError(f"unrecognized arguments: {' '.join(rest)}")
    opts = _options(args)
    if args.kind == "finetune":
        tuning.finetune_sweep(
            args.model, args.shards, from_flags(FinetuneConfig, args), args.space, opts, args.register_as, args.alias
        )
    elif args.kind == "perturb":
        tuning.perturb_sweep(
            args.model, args.shards, from_flags(PerturbConfig, args), args.space, opts, args.theta_budget
        )
    else:
        tuning.scale_sweep(
            args.shards,
            _list(args.widths, int, "--widths"),
            _list(args.depths, int, "--depths"),
            _list(args.mask_ratios, float, "--mask-ratios"),
            _list(args.budget, float, "--budget"),
            opts,
            args.recipe,
            parse_overrides(rest),
            args.deepspeed,
            args.head_dim,
            args.val_points,
        )


if __name__ == "__main__":
    sys.exit(main())
