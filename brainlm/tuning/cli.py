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
from dataclasses import dataclass, field
from pathlib import Path

from brainlm.eval.finetune import FinetuneConfig
from brainlm.eval.perturb import PerturbConfig
from brainlm.exceptions import ConfigError, exit_code
from brainlm.schema import Command, Flags, add_commands, add_version, from_flags
from brainlm.training.recipe import parse_overrides
from brainlm.tuning.options import SweepOptions

CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # shipped with the package (configs/ in a checkout)


@dataclass(kw_only=True)
class Pretrained:
    """What a fine-tuning or perturbation sweep starts from."""

    model: str
    """pretrained model: a folder or models:/NAME@ALIAS"""
    shards: str
    """shard set (folder or s3://...) with manifest.json"""


@dataclass(kw_only=True)
class FinetuneSweep(Pretrained):
    space: str | None = None
    """search space YAML (keys: FinetuneConfig fields; default configs/tune/finetune.yaml)"""
    register_as: str | None = None
    """registered model name (default brainlm-finetuned-TARGET)"""
    alias: str = "champion"
    """alias set on the best model"""


@dataclass(kw_only=True)
class PerturbSweep(Pretrained):
    space: str | None = None
    """search space YAML (keys: PerturbConfig fields; default configs/tune/perturb.yaml)"""
    theta_budget: float = 0.1
    """sparsity budget: mean |theta| (robust-scaled units) allowed without penalty"""


@dataclass(kw_only=True)
class ScaleSweep:
    shards: str
    """shard set (folder or s3://...) with manifest.json"""
    widths: list[str]
    """encoder widths, e.g. 32,64"""
    depths: list[str]
    """encoder layers, e.g. 1,2"""
    mask_ratios: list[str] = field(default_factory=lambda: ["0.75"])
    """mask ratios"""
    budget: list[str]
    """training FLOPs per run, one set of runs per budget, e.g. 1e12"""
    recipe: str | None = None
    """pretraining recipe the shapes vary (default configs/pretrain/debug.yaml)"""
    deepspeed: str = "ds_config.json"
    """DeepSpeed JSON"""
    head_dim: int = 32
    """heads = max(1, width // head-dim)"""
    val_points: int = 4
    """validations per run (the last at the end)"""


def _list(values: list[str], kind: type, flag: str) -> list:
    try:
        return [kind(float(x)) if kind is int else kind(x) for x in values]
    except ValueError:
        raise ConfigError(
            f"{flag} expects comma-separated {kind.__name__}s (e.g. 32,64), got {','.join(values)!r}"
        ) from None


def parser(prog: str = "brainlm tune") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version(p)
    sub = p.add_subparsers(dest="kind", required=True)
    sweep, fixed = Flags(SweepOptions, group="sweep"), "(fixed for every trial unless the space varies it)"
    commands = [
        Command(
            "finetune",
            _finetune,
            "ASHA over fine-tuning knobs; registers the best model",
            (FinetuneSweep, Flags(FinetuneConfig, ("seeds", "device"), f"fine-tuning {fixed}"), sweep),
            "ASHA over the FinetuneConfig knobs of --space, early stopping on the per-epoch validation loss. The "
            "flags below set everything the space does not vary. The best trial's model is registered as "
            "brainlm-finetuned-TARGET with alias champion.",
        ),
        Command(
            "perturb",
            _perturb,
            "ASHA over perturbation knobs, scored by reach within a sparsity budget",
            (PerturbSweep, Flags(PerturbConfig, ("device",), f"perturbation {fixed}"), sweep),
            "ASHA over the PerturbConfig knobs of --space. score = reached - max(0, mean|theta| - budget) / budget: "
            "the share of the source-to-target embedding distance closed, less the relative excess of the "
            "perturbation over --theta-budget. Higher is better.",
        ),
        Command(
            "scale",
            _scale,
            "short pretraining runs over width x depth x mask ratio at fixed compute",
            (ScaleSweep, Flags(SweepOptions, ("samples", "grace_period", "reduction_factor"), "sweep")),
            "One pretraining run per width x depth x mask ratio x budget, each for budget / (FLOPs per sample x "
            "global batch) steps; a figure and tables of validation masked R^2 against compute and parameters. "
            "Further --section.key VALUE flags override the recipe (brainlm pretrain --help lists them).",
        ),
    ]
    add_commands(sub, commands)
    return p


def main(argv: list[str] | None = None, prog: str = "brainlm tune") -> int:
    args, rest = parser(prog).parse_known_args(argv)
    return exit_code(lambda: _run(args, rest))


def _run(args: argparse.Namespace, rest: list[str]) -> None:
    if rest and args.kind != "scale":
        raise ConfigError(f"unrecognized arguments: {' '.join(rest)}")
    args.func(args, rest)


def _finetune(a: argparse.Namespace, rest: list[str]) -> None:
    from brainlm import tuning  # ray: after parsing, so --help stays quick

    space = a.space or CONFIGS / "tune" / "finetune.yaml"
    cfg = from_flags(FinetuneConfig, a)
    tuning.finetune_sweep(a.model, a.shards, cfg, space, from_flags(SweepOptions, a), a.register_as, a.alias)


def _perturb(a: argparse.Namespace, rest: list[str]) -> None:
    from brainlm import tuning

    space = a.space or CONFIGS / "tune" / "perturb.yaml"
    tuning.perturb_sweep(
        a.model, a.shards, from_flags(PerturbConfig, a), space, from_flags(SweepOptions, a), a.theta_budget
    )


def _scale(a: argparse.Namespace, rest: list[str]) -> None:
    from brainlm import tuning

    tuning.scale_sweep(
        a.shards,
        _list(a.widths, int, "--widths"),
        _list(a.depths, int, "--depths"),
        _list(a.mask_ratios, float, "--mask-ratios"),
        _list(a.budget, float, "--budget"),
        from_flags(SweepOptions, a, samples=1),  # a grid: every point once
        a.recipe or CONFIGS / "pretrain" / "debug.yaml",
        parse_overrides(rest),
        a.deepspeed,
        a.head_dim,
        a.val_points,
    )


if __name__ == "__main__":
    sys.exit(main())
