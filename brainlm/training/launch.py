"""Pretrain a BrainLM masked autoencoder with DeepSpeed.

    deepspeed launcher/pretrain.py --deepspeed ds_config.json [--config configs/pretrain/13m.yaml] [--a.b VALUE ...]
    torchrun --nproc_per_node 2 -m brainlm.training --deepspeed ds_config.json ...
    brainlm pretrain --deepspeed ds_config.json ...          (one process; python -m brainlm.training alike)

Parses, builds the recipe, and calls the same ``brainlm.training.pretrain.run`` the tests call.
"""

from __future__ import annotations

import argparse
import os

from brainlm.exceptions import exit_code
from brainlm.schema import add_version
from brainlm.training.recipe import help_text, load_recipe


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False
    )
    parser.add_argument("--deepspeed", default="ds_config.json", help="DeepSpeed JSON (default ds_config.json)")
    parser.add_argument("--config", help="YAML recipe, e.g. configs/pretrain/13m.yaml (default: all defaults)")
    parser.add_argument("--local_rank", "--local-rank", type=int, help="set by the deepspeed launcher")
    parser.add_argument("-h", "--help", action="store_true", help="show this help and every override")
    add_version(parser)
    args, overrides = parser.parse_known_args(argv)
    if args.help:
        parser.print_help()
        print("\noverrides (--section.field VALUE):\n" + help_text())
        return 0
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))

    def pretrain() -> None:
        cfg = load_recipe(args.config, overrides)
        from brainlm.training.pretrain import run

        run(cfg, args.deepspeed)

    return exit_code(pretrain)
