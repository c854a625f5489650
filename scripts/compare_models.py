"""Two models on the same evaluation windows and masks, paired: `brainlm reconstruct`'s metrics.json of each (same
shards, split, mask ratio and context), the margin of the first over the second with its bootstrap interval over
windows (and subjects, with two or more), beside the first's best baseline.

    python scripts/compare_models.py POOLED/metrics.json SINGLE/metrics.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from brainlm.protocol import WindowSums, compare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", help="metrics.json of the model to score")
    parser.add_argument("second", help="metrics.json of the model to compare it with")
    args = parser.parse_args()
    a, b = (json.loads(Path(p).read_text()) for p in (args.first, args.second))
    subjects = a["window_subjects"]
    for masking in a["window_sums"]:
        first, second = WindowSums.from_json(a["window_sums"][masking]), WindowSums.from_json(b["window_sums"][masking])
        if not np.array_equal(first.target, second.target):
            raise SystemExit(f"{masking}: the two files are not the same windows and masks")
        sums = WindowSums(first.target, {**first.sse, "second:model": second.sse["model"]})
        bar = a["comparisons"][masking]["best_baseline"]
        for other in ("second:model", bar):
            c = compare(sums, subjects, "model", other)
            subject = f", subjects {c.subjects[0]:+.4f} .. {c.subjects[1]:+.4f}" if c.subjects else ""
            print(
                f"{masking}: model {sums.r2('model'):.4f} vs {other} {sums.r2(other):.4f}: {c.margin:+.4f} "
                f"[{c.windows[0]:+.4f}, {c.windows[1]:+.4f}] over windows{subject} ({c.winner})"
            )


if __name__ == "__main__":
    main()
