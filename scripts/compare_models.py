"""Two models on the same evaluation windows and masks, paired: `brainlm reconstruct`'s metrics.json of each (same
shards, split, mask ratio and context), the margin of the first over the second with its bootstrap interval over
windows (and subjects, with two or more), beside the first's best baseline. Comma-separated lists (one file per
subject fold, in the same order for both models) pool the folds' windows, as `brainlm benchmark --stage report`.

    python scripts/compare_models.py POOLED/metrics.json SINGLE/metrics.json
    python scripts/compare_models.py P0/metrics.json,P1/metrics.json S0/metrics.json,S1/metrics.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from brainlm.protocol import WindowSums, compare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", help="metrics.json of the model to score (comma-separated: one per fold)")
    parser.add_argument("second", help="metrics.json of the model to compare it with (as many, same order)")
    args = parser.parse_args()
    firsts, seconds = ([json.loads(Path(p).read_text()) for p in arg.split(",")] for arg in (args.first, args.second))
    if len(firsts) != len(seconds):
        raise SystemExit(f"{len(firsts)} files for the first model, {len(seconds)} for the second: one per fold each")
    subjects = [s for a in firsts for s in a["window_subjects"]]
    for masking in firsts[0]["window_sums"]:
        parts = []
        for i, (a, b) in enumerate(zip(firsts, seconds, strict=True)):
            first, second = (WindowSums.from_json(m["window_sums"][masking]) for m in (a, b))
            if not np.array_equal(first.target, second.target):
                raise SystemExit(f"{masking}, file {i + 1}: the two files are not the same windows and masks")
            parts.append(WindowSums(first.target, {**first.sse, "second:model": second.sse["model"]}))
        sums = WindowSums.concat(parts)
        baselines = [k for k in sums.sse if k not in ("model", "second:model")]
        bar = max(baselines, key=sums.r2)  # the best baseline over every fold's windows
        for other in ("second:model", bar):
            c = compare(sums, subjects, "model", other)
            subject = f", subjects [{c.subjects[0]:+.4f}, {c.subjects[1]:+.4f}]" if c.subjects else ""
            print(
                f"{masking}: model {sums.r2('model'):.4f} vs {other} {sums.r2(other):.4f}: {c.margin:+.4f} "
                f"[{c.windows[0]:+.4f}, {c.windows[1]:+.4f}] over windows{subject} ({c.winner})"
            )


if __name__ == "__main__":
    main()
