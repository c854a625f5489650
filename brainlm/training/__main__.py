"""``python -m brainlm.training``: pretraining (``torchrun -m brainlm.training`` for several ranks)."""

import sys

from brainlm.training.launch import main

sys.exit(main(prog="python -m brainlm.training"))
