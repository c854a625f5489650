"""Ray Tune sweeps (fine-tuning, perturbation, model shape): a shim over ``brainlm tune``.

    python launcher/tune.py finetune --model models:/brainlm-debug@current --shards demo/shards --target age ...

The same as ``brainlm tune ...`` (``brainlm.tuning.cli``), kept for existing scripts and the cluster's Jobs.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from brainlm.tuning.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="launcher/tune.py"))
