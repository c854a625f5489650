"""One forward pass of each released BrainLM architecture at its full size, on this machine, side by side.

The three releases, built here with random weights (the speed does not depend on the values) and the options their
import sets: ``13M`` (our BrainLM with the paper model's options: post-LayerNorm, value convolution 65, 424 parcels
x 200 timepoints = 4,240 tokens), ``111M`` and ``650M`` (ImageMAE: the window sorted and padded to 432 x 432 in 16 x
16 patches = 729 tokens, or 434 x 434 in 14 x 14 = 961). Per model, one window (batch 1, fp32, eval, no grad):

- embed: the encoder over every token (what ``brainlm embed`` runs per window);
- reconstruct: encoder over the 25% visible tokens + decoder over all (mask ratio 0.75, the releases' training).

Runs alternate between the models (round-robin, ``--repeats`` rounds after one warm-up), so a load change on a
shared machine hits them alike; the median is reported with its spread and what other processes took.

Usage: python -m benchmarks.bench_releases --out bench-results/releases.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import CpuMonitor, command_line, machine, now_utc, write_json
from brainlm.model import BrainLM, get_preset
from brainlm.model.vitmae import ImageMAE, ImageMAEConfig

DECODER = dict(decoder_hidden_size=512, decoder_num_layers=8, decoder_num_heads=16, decoder_intermediate_size=2048)
RELEASES = {
    "111M": dict(image_size=432, patch_size=16, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
    "650M": dict(image_size=434, patch_size=14, hidden_size=1280, num_layers=32, num_heads=16, intermediate_size=5120),
}


def build(name: str) -> torch.nn.Module:
    if name == "13M":
        config = get_preset(
            "13m", block_norm="post", value_conv_kernel=65, temporal_layout="interleaved", decoder_head="mlp"
        )
        return BrainLM(config).eval()
    return ImageMAE(ImageMAEConfig(**RELEASES[name], **DECODER)).eval()


def passes(model: torch.nn.Module, x: torch.Tensor, coords: torch.Tensor) -> dict[str, callable]:
    gen = torch.Generator().manual_seed(0)
    return {
        "embed": lambda: model.encode(x, coords),
        "reconstruct": lambda: model(x, coords, mask_ratio=0.75, generator=gen),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="13M,111M,650M")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = args.models.split(",")
    x, coords = torch.randn(1, 424, 200), torch.randn(424, 3) * 50
    models = {n: build(n) for n in names}
    params = {n: m.num_params() for n, m in models.items()}
    times: dict[str, dict[str, list[float]]] = {n: {"embed": [], "reconstruct": []} for n in names}
    others: list[float] = []
    with torch.no_grad():
        for n in names:  # warm-up
            for run in passes(models[n], x, coords).values():
                run()
        for r in range(args.repeats):
            with CpuMonitor() as mon:
                for n in names:
                    for kind, run in passes(models[n], x, coords).items():
                        t0 = time.perf_counter()
                        run()
                        times[n][kind].append(time.perf_counter() - t0)
            others.append(mon.foreign_share)
            print(f"round {r + 1}/{args.repeats}: others used {mon.foreign_share:.0%} of the CPU", flush=True)
    rows = {}
    for n in names:
        rows[n] = {"params_millions": round(params[n] / 1e6, 1)}
        for kind, values in times[n].items():
            rows[n][f"{kind}_s"] = round(statistics.median(values), 3)
            rows[n][f"{kind}_range_s"] = [round(min(values), 3), round(max(values), 3)]
        print(
            f"{n:>5}: {rows[n]['params_millions']:7.1f}M params  embed {rows[n]['embed_s']:.3f} s  "
            f"reconstruct {rows[n]['reconstruct_s']:.3f} s  (median of {args.repeats}, batch 1)"
        )
    write_json(
        args.out,
        {
            "date": now_utc(),
            "command": command_line(),
            "machine": machine(),
            "threads": args.threads,
            "others_cpu_share": [round(o, 3) for o in others],
            "models": rows,
        },
    )


if __name__ == "__main__":
    main()
