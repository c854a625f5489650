"""Pretrain a BrainLM masked autoencoder with DeepSpeed: the script the deepspeed launcher runs.

    deepspeed launcher/pretrain.py --deepspeed ds_config.json [--config configs/pretrain/13m.yaml] [--a.b VALUE ...]
    torchrun --nproc_per_node 2 launcher/pretrain.py --deepspeed ds_config.json ...
    python launcher/pretrain.py --deepspeed ds_config.json ...

A shim over ``brainlm.training.launch`` (also ``brainlm pretrain`` and ``python -m brainlm.training``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from brainlm.training.launch import main

if __name__ == "__main__":
    sys.exit(main())
