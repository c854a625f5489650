"""The Markdown tables of docs/results-real.md, straight from `brainlm benchmark` summaries (no number copied by hand).

    python scripts/real_tables.py --bench "context-free model=real-results/bench-hcp" \
        --bench "context model=real-results/bench-hcp-context" [--methods ridge,spatiotemporal,adaptive,adaptive+ctx]

For every result key (mask ratio / context / masking) the benchmarks share: each method's pooled R^2 over all folds'
test windows, and per benchmark the model's margin over the best baseline with its 95% intervals over windows and
over subjects, the margin per fold (mean and standard deviation) and the verdict; then the margin per test subject.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(spec: str) -> tuple[str, dict]:
    label, _, folder = spec.partition("=")
    return label, json.loads((Path(folder) / "summary.json").read_text())


def interval(pair: list[float] | None) -> str:
    return "-" if not pair else f"[{pair[0]:+.3f}, {pair[1]:+.3f}]"


def key_label(key: str, result: dict) -> tuple[str, str, str]:
    parts = key.split("/")
    return parts[0], result.get("context", "0"), parts[-1]


def tables(benches: list[tuple[str, dict]], methods: list[str]) -> str:
    keys = [k for k in benches[0][1]["results"] if all(k in b["results"] for _, b in benches)]
    out = []
    head = "| mask | context | masking | " + " | ".join(methods) + " | model | best baseline | margin | 95% CI windows"
    head += " | 95% CI subjects | folds: mean (sd) | verdict |"
    for label, bench in benches:
        out += [f"**{label}** ({len(bench['folds'])} subject folds, {bench['model']})", "", head]
        out.append("|---" * (len(methods) + 10) + "|")
        for key in keys:
            r = bench["results"][key]
            ratio, context, masking = key_label(key, r)
            c = r["model_vs_best"]
            cells = [f"{r['pooled_r2'][m]:.3f}" if m in r["pooled_r2"] else "-" for m in methods]
            out.append(
                f"| {ratio} | {context} | {masking} | " + " | ".join(cells) + f" | {r['pooled_r2']['model']:.3f} | "
                f"{r['best_baseline']} | {c['margin']:+.4f} | {interval(c['interval_windows'])} | "
                f"{interval(c['interval_subjects'])} | {r['fold_mean']:+.4f} ({r['fold_sd']:.4f}) | {c['winner']} |"
            )
        out.append("")
    for label, bench in benches:
        subjects = sorted({s for k in keys for s in bench["results"][k]["model_vs_best"]["per_subject"]})
        out += [f"Margin over the best baseline per test subject, {label}:", ""]
        out += ["| mask / context / masking | " + " | ".join(subjects) + " |", "|---" * (len(subjects) + 1) + "|"]
        for key in keys:
            per = bench["results"][key]["model_vs_best"]["per_subject"]
            ratio, context, masking = key_label(key, bench["results"][key])
            out.append(f"| {ratio} / {context} / {masking} | " + " | ".join(f"{per[s]:+.3f}" for s in subjects) + " |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", action="append", required=True, help="LABEL=FOLDER of a brainlm benchmark (repeat)")
    p.add_argument("--methods", default="ridge,spatiotemporal,adaptive,ridge+ctx,adaptive+ctx")
    a = p.parse_args(argv)
    print(tables([load(b) for b in a.bench], a.methods.split(",")))


if __name__ == "__main__":
    main()
