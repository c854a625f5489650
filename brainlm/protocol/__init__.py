"""The evaluation protocol: what every measured claim in this project stands on, below training and the analyses.

Rules (docs/evaluation.md says why each exists):
- fixed windows and seeded masks (``masks``): the same window of the same split gets the same mask in every run,
  for every model and baseline, in pretraining's validation and in ``brainlm reconstruct`` alike;
- one masked R^2 (``r2``): pooled over every masked value, unclipped, from sums that add up across batches, ranks,
  windows and folds;
- subject folds (``folds``): every subject is a test subject once, never in its fold's training or validation set;
  validation is a held-out subject set of its own, and nothing is trained or chosen on test subjects;
- recording context (``context``): a window's context is the other windows of its own recording that do not
  overlap it, nearest first, the same for every model and baseline;
- intervals (``intervals``): a margin comes with paired bootstrap intervals over test windows and over test
  subjects (resampled as units); a winner is named only when the interval excludes 0, else it is a tie.
"""

from brainlm.protocol.context import context_label, context_statistics, context_windows, parse_context
from brainlm.protocol.folds import Fold, subject_folds
from brainlm.protocol.intervals import Comparison, best, compare, verdict
from brainlm.protocol.masks import MASK_SEED, fixed_masks, model_masks, protocol_seeds, time_mask
from brainlm.protocol.r2 import R2Sums, UnitScores, WindowSums, r2_parts

__all__ = [
    "MASK_SEED",
    "Comparison",
    "Fold",
    "R2Sums",
    "UnitScores",
    "WindowSums",
    "best",
    "compare",
    "context_label",
    "context_statistics",
    "context_windows",
    "fixed_masks",
    "model_masks",
    "parse_context",
    "protocol_seeds",
    "r2_parts",
    "subject_folds",
    "time_mask",
    "verdict",
]
