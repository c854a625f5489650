"""Benchmark the data pipeline: `data_prep build` throughput, and shard read throughput of the training loader.

What it measures, in one run, side by side (configurations interleaved, each repeated --repeats times):
1. `build` (the function `python -m data_prep build` calls, timed in-process: interpreter start-up and
   imports excluded, the worker pool's start-up included) from
   - parcel arrays: a synthetic cohort, `python -m data_prep synth --out X --subjects N` (300 parcels x
     490 timepoints per recording, .npy);
   - NIfTI: `synth --nifti` (4D 5 mm volumes, BIDS derivatives names), built from X/bids with
     --atlas X/atlas_dseg.nii.gz --atlas-table X/atlas.tsv (nilearn parcellation);
   with --workers 1 and 2, to a local folder and to S3 (a real SeaweedFS `weed mini` on loopback ports).
   Reported: recordings/s, input MB/s (bytes of the input files) and output MB/s (bytes of the shards).
2. Reads of the built arrays shards (local and S3) with 0, 1 and 2 DataLoader workers:
   - the training loader, `brainlm.data.loader.TrainLoader` (micro batch 32, window 200: what
     `launcher/pretrain.py` runs): crops/s;
   - a plain `webdataset.WebDataset(urls, resampled=True).decode()` pipeline cutting the same window and
     batching 32: crops/s.
3. Loader supply vs training demand: the loader's crops/s against the 13m preset's training throughput
   (the CPU figure of benchmarks/bench_pretrain.py or benchmarks/bench_model.py, when their JSON is given) and
   against an ESTIMATE of what one H100 would consume: 989 TFLOP/s (bf16 dense) x 40% MFU /
   `BrainLM(get_preset("13m")).flops_per_sample(0.75)`.

The machine may be shared: every row records the share of the CPU that other processes took while it
ran (`foreign_cpu_share`); rows above --max-foreign are flagged and repeated once, unless the two rows
before were disturbed too (a persistent load).

    python -m benchmarks.bench_data_prep --out bench-results/data_prep.json \
        [--pretrain-json bench-results/pretrain.json] [--model-json bench-results/model.json]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    ROOT,
    CpuMonitor,
    command_line,
    create_bucket,
    dir_bytes,
    machine,
    now_utc,
    seaweedfs,
    spread,
    wait_for_quiet,
    write_json,
)

H100_BF16_PEAK_TFLOPS = 989.0
ASSUMED_MFU = 0.40
MB = 1e6


def synth(out: Path, subjects: int, timepoints: int | None = None, nifti: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "data_prep", "synth", "--out", str(out), "--subjects", str(subjects)]
    if timepoints:
        cmd += ["--timepoints", str(timepoints)]
    if nifti:
        cmd.append("--nifti")
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return cmd[1:]


def one_build(source: dict, out: str, workers: int, shard_mb: float) -> dict[str, Any]:
    from data_prep.build import BuildConfig, build

    cfg = BuildConfig(
        inputs=source["inputs"],
        out=out,
        atlas=source.get("atlas"),
        atlas_table=source.get("atlas_table"),
        workers=workers,
        shard_mb=shard_mb,
        progress=False,
    )
    with CpuMonitor() as mon, contextlib.redirect_stderr(io.StringIO()):  # build's progress lines
        manifest = build(cfg)
    shards = manifest.shards
    return {
        **mon.record(),
        "out": out,
        "recordings": len(manifest.recordings),
        "crops": sum(s["samples"] for s in shards),
        "shards": len(shards),
        "shard_bytes": sum(s["bytes"] for s in shards),
    }


def build_benchmarks(args, sources: dict, dests: dict, log) -> list[dict]:
    rows = []
    for rep, (sname, source), (dname, dest), workers in itertools.product(
        range(args.repeats), sources.items(), dests.items(), args.workers
    ):
        out = f"{dest}/{sname}-w{workers}-r{rep}"
        for attempt in range(2):
            r = one_build(source, out + (f"-retry{attempt}" if attempt else ""), workers, args.shard_mb)
            r.update(source=sname, dest=dname, workers=workers, repeat=rep, attempt=attempt)
            r["input_bytes"] = source["input_bytes"]
            r["recordings_per_s"] = r["recordings"] / r["wall_s"]
            r["input_mb_per_s"] = source["input_bytes"] / MB / r["wall_s"]
            r["output_mb_per_s"] = r["shard_bytes"] / MB / r["wall_s"]
            r["disturbed"] = r["foreign_cpu_share"] > args.max_foreign
            rows.append(r)
            log(
                f"  build {sname:<6} -> {dname:<5} workers {workers} rep {rep}: {r['wall_s']:6.2f} s, "
                f"{r['recordings_per_s']:6.1f} rec/s, {r['output_mb_per_s']:6.1f} MB/s out "
                f"(others used {r['foreign_cpu_share']:.0%} of the CPU)"
            )
            if not should_retry(rows):
                break
    return rows


def should_retry(rows: list[dict]) -> bool:
    """Repeat a disturbed measurement once, unless the load is persistent (the two measurements before it
    were disturbed too: another long job; repeating would only double the run)."""
    before = rows[-3:-1]
    return rows[-1]["disturbed"] and not (len(before) == 2 and all(r["disturbed"] for r in before))


# -- reading ------------------------------------------------------------------------------------------------


def _time_batches(batches, batch_size: int, min_seconds: float, min_batches: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    next(batches)
    first = time.perf_counter() - t0
    n = 0
    with CpuMonitor() as mon:
        while n < min_batches or time.perf_counter() - mon.t0 < min_seconds:
            batch = next(batches)
            n += 1
    shape = list((batch["signal"] if isinstance(batch, dict) else batch).shape)
    rate = n * batch_size / mon.wall
    return {**mon.record(), "first_batch_s": first, "batches": n, "crops_per_s": rate, "shape": shape}


def read_trainloader(url: str, workers: int, args) -> dict[str, Any]:
    from brainlm.data.loader import TrainLoader
    from brainlm.data.shardset import ShardSet

    loader = TrainLoader(ShardSet.open(url), "train", args.micro_batch, args.window, seed=0, num_workers=workers)
    try:
        return _time_batches(loader, args.micro_batch, args.read_seconds, args.min_batches)
    finally:
        del loader
        gc.collect()


def read_plain_wds(url: str, workers: int, args) -> dict[str, Any]:
    import torch
    import webdataset as wds

    from brainlm.data.shardset import ShardSet
    from brainlm.data.store import register_webdataset

    register_webdataset()  # forked DataLoader workers inherit the s3:// handler
    urls = ShardSet.open(url).urls("train")
    window = args.window

    def crop(sample: dict) -> dict:
        return {"signal": np.ascontiguousarray(sample["signal.npy"][:, :window], dtype=np.float32)}

    dataset = (
        wds.WebDataset(urls, resampled=True, shardshuffle=False, empty_check=False)
        .decode()
        .map(crop)
        .batched(args.micro_batch, partial=False)
    )
    kwargs = {"prefetch_factor": 4} if workers else {}
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, **kwargs)
    iterator = iter(loader)
    try:
        return _time_batches(iterator, args.micro_batch, args.read_seconds, args.min_batches)
    finally:
        del iterator, loader
        gc.collect()


def read_benchmarks(args, roots: dict[str, str], log) -> list[dict]:
    readers = {"TrainLoader": read_trainloader, "plain-wds": read_plain_wds}
    rows = []
    for rep, (rname, reader), (store, url), workers in itertools.product(
        range(args.repeats), readers.items(), roots.items(), args.read_workers
    ):
        for attempt in range(2):
            r = reader(url, workers, args)
            r.update(reader=rname, store=store, workers=workers, repeat=rep, attempt=attempt)
            r["disturbed"] = r["foreign_cpu_share"] > args.max_foreign
            rows.append(r)
            log(
                f"  read {rname:<11} {store:<5} workers {workers} rep {rep}: {r['crops_per_s']:7.0f} crops/s "
                f"(first batch {r['first_batch_s']:.2f} s; others used {r['foreign_cpu_share']:.0%} of the CPU)"
            )
            if not should_retry(rows):
                break
    return rows


# -- summary ------------------------------------------------------------------------------------------------


def summarise(rows: list[dict], keys: tuple[str, ...], metrics: tuple[str, ...]) -> list[dict]:
    """One row per configuration: best/median/worst of each metric over the undisturbed repeats (all
    repeats when every one was disturbed)."""
    out = []
    for key in dict.fromkeys(tuple(r[k] for k in keys) for r in rows):
        group = [r for r in rows if tuple(r[k] for k in keys) == key]
        clean = [r for r in group if not r["disturbed"]] or group
        row: dict[str, Any] = dict(zip(keys, key, strict=True))
        for m in metrics:
            row[m] = spread([r[m] for r in clean])
        row["foreign_cpu_share_max"] = max(r["foreign_cpu_share"] for r in clean)
        row["all_disturbed"] = all(r["disturbed"] for r in group)
        row["runs"] = len(group)
        out.append(row)
    return out


def find(rows: list[dict], **match) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def training_demand(args) -> dict[str, Any]:
    """What the 13m preset consumes: measured on this CPU (from the other benchmarks' JSON) and the H100
    estimate."""
    from brainlm.model import BrainLM, get_preset

    demand: dict[str, Any] = {"cpu": {}, "h100_estimate": {}}
    if args.pretrain_json and Path(args.pretrain_json).exists():
        pre = json.loads(Path(args.pretrain_json).read_text())
        for r in pre.get("summary", []):
            if r.get("preset") == "13m" and r.get("window") == 200:
                demand["cpu"][f"pretrain.py 13m window 200, {r['ranks']} rank(s), ZeRO {r['stage']}"] = r[
                    "samples_per_s"
                ]["median"]
    if args.model_json and Path(args.model_json).exists():
        mod = json.loads(Path(args.model_json).read_text())
        for r in mod.get("throughput", []):
            if r["model"].startswith("brainlm"):
                demand["cpu"][f"model.py {r['model']} 13m (424 parcels, window 200, batch 8)"] = r["samples_per_s"]
    for parcels in (424, 300):
        flops = BrainLM(get_preset("13m", num_parcels=parcels)).flops_per_sample(0.75)
        demand["h100_estimate"][f"13m, {parcels} parcels x 200, mask 0.75"] = {
            "flops_per_sample": flops,
            "samples_per_s": H100_BF16_PEAK_TFLOPS * 1e12 * ASSUMED_MFU / flops,
            "assumption": f"{H100_BF16_PEAK_TFLOPS:.0f} TFLOP/s bf16 dense x {ASSUMED_MFU:.0%} MFU "
            "(an estimate, not measured)",
        }
    return demand


def print_tables(result: dict) -> None:
    m = result["machine"]
    print(f"\n{result['date']}  {m['cpu']} ({m['cpu_count']} CPUs)  torch {m.get('torch')}")
    print(result["command"])
    print("\nbuild (best of the undisturbed repeats; ratios of medians)")
    print(
        f"{'source':<7}{'dest':<6}{'wk':>3}{'recs':>6}{'in MB':>8}{'out MB':>8}{'s (best/med)':>15}"
        f"{'rec/s':>8}{'in MB/s':>9}{'out MB/s':>9}{'x w1':>6}{'S3/loc':>8}{'others':>8}"
    )
    builds = result["build_summary"]
    for r in builds:
        w1 = find(builds, source=r["source"], dest=r["dest"], workers=1)
        loc = find(builds, source=r["source"], dest="local", workers=r["workers"])
        med = r["recordings_per_s"]["median"]
        x_w1 = med / w1["recordings_per_s"]["median"] if w1 else float("nan")
        s3_loc = med / loc["recordings_per_s"]["median"] if loc else float("nan")
        secs = f"{r['wall_s']['worst']:.2f}/{r['wall_s']['median']:.2f}"
        print(
            f"{r['source']:<7}{r['dest']:<6}{r['workers']:>3}{r['recordings']['median']:>6.0f}"
            f"{r['input_bytes']['median'] / MB:>8.1f}{r['shard_bytes']['median'] / MB:>8.1f}{secs:>15}"
            f"{r['recordings_per_s']['best']:>8.1f}{r['input_mb_per_s']['best']:>9.1f}"
            f"{r['output_mb_per_s']['best']:>9.1f}{x_w1:>6.2f}{s3_loc:>8.2f}{r['foreign_cpu_share_max']:>8.0%}"
        )
    print(f"\nreads: crops/s (micro batch {result['args']['micro_batch']}, window {result['args']['window']})")
    print(
        f"{'reader':<12}{'store':<6}{'wk':>3}{'best':>8}{'median':>8}{'range':>7}{'x w0':>6}{'S3/loc':>8}"
        f"{'first s':>8}{'others':>8}"
    )
    reads = result["read_summary"]
    for r in reads:
        w0 = find(reads, reader=r["reader"], store=r["store"], workers=0)
        loc = find(reads, reader=r["reader"], store="local", workers=r["workers"])
        med = r["crops_per_s"]["median"]
        print(
            f"{r['reader']:<12}{r['store']:<6}{r['workers']:>3}{r['crops_per_s']['best']:>8.0f}{med:>8.0f}"
            f"{r['crops_per_s']['range_pct']:>6.0f}%{med / w0['crops_per_s']['median']:>6.2f}"
            f"{med / loc['crops_per_s']['median']:>8.2f}{r['first_batch_s']['median']:>8.2f}"
            f"{r['foreign_cpu_share_max']:>8.0%}"
        )
    cmp = result["supply_vs_demand"]
    w = cmp["supply_workers"]
    where = f"{w} DataLoader worker(s)" if w else "read in the training process, 0 workers"
    print("\nloader supply vs training demand")
    print(f"  supply: TrainLoader, local shards, best worker setting: {cmp['supply_crops_per_s']:.0f} crops/s")
    for name, sps in cmp["demand"]["cpu"].items():
        print(f"  CPU (measured) {name}: {sps:.2f} samples/s -> loader {cmp['supply_crops_per_s'] / sps:,.0f}x")
    for name, est in cmp["demand"]["h100_estimate"].items():
        print(
            f"  H100 ESTIMATE {name}: {est['flops_per_sample'] / 1e9:.0f} GFLOP/sample, "
            f"{est['samples_per_s']:,.0f} samples/s -> loader {cmp['supply_crops_per_s'] / est['samples_per_s']:.2f}x "
            f"({where} on this CPU)"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a new temporary folder)")
    parser.add_argument("--subjects", type=int, default=80, help="array cohort: subjects (2 recordings each)")
    parser.add_argument("--nifti-subjects", type=int, default=8, help="NIfTI cohort: subjects (2 recordings each)")
    parser.add_argument("--nifti-timepoints", type=int, default=200, help="NIfTI cohort: timepoints per recording")
    parser.add_argument("--workers", default="1,2", help="build --workers values")
    parser.add_argument("--shard-mb", type=float, default=16.0, help="build --shard-mb (small: several shards)")
    parser.add_argument("--repeats", type=int, default=2, help="repeats of every configuration (interleaved)")
    parser.add_argument("--read-workers", default="0,1,2", help="DataLoader workers for the reads")
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--window", type=int, default=200)
    parser.add_argument("--read-seconds", type=float, default=3.0, help="minimum timed seconds per read")
    parser.add_argument("--min-batches", type=int, default=10)
    parser.add_argument("--no-s3", action="store_true", help="local folder only")
    parser.add_argument("--skip-nifti", action="store_true")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        help="first wait up to this many seconds for other processes to use less than --max-foreign of the CPU",
    )
    parser.add_argument(
        "--max-foreign",
        type=float,
        default=0.25,
        help="a measurement during which other processes used more than this share of the CPU is "
        "repeated once and flagged (default 0.25)",
    )
    parser.add_argument("--pretrain-json", type=Path, help="benchmarks/bench_pretrain.py output: the CPU 13m figure")
    parser.add_argument("--model-json", type=Path, help="benchmarks/bench_model.py output: the CPU 13m figure")
    args = parser.parse_args(argv)
    args.workers = [int(x) for x in args.workers.split(",")]
    args.read_workers = [int(x) for x in args.read_workers.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-data-prep-"))
    work.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    quiet = wait_for_quiet(args.max_foreign, args.wait_quiet, log)

    result: dict[str, Any] = {
        "date": now_utc(),
        "command": command_line(),
        "machine": machine(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "work": str(work),
        "foreign_cpu_share_at_start": round(quiet, 3),
    }
    t_start = time.perf_counter()
    log(f"cohorts in {work}")
    sources: dict[str, dict] = {}
    arrays = work / "arrays"
    if not (arrays / "recordings.tsv").exists():
        synth(arrays, args.subjects)
    sources["arrays"] = {
        "inputs": str(arrays),
        "synth": f"python -m data_prep synth --out {arrays} --subjects {args.subjects}",
        "input_bytes": dir_bytes(arrays / "recordings", "*.npy"),
    }
    if not args.skip_nifti:
        nifti = work / "nifti"
        if not (nifti / "bids").exists():
            synth(nifti, args.nifti_subjects, args.nifti_timepoints, nifti=True)
        sources["nifti"] = {
            "inputs": str(nifti / "bids"),
            "atlas": str(nifti / "atlas_dseg.nii.gz"),
            "atlas_table": str(nifti / "atlas.tsv"),
            "synth": f"python -m data_prep synth --out {nifti} --subjects {args.nifti_subjects} "
            f"--timepoints {args.nifti_timepoints} --nifti",
            "input_bytes": dir_bytes(nifti / "bids", "*.nii.gz"),
        }
    result["sources"] = sources
    # Warm the imports every configuration needs, so that the first timed build does not pay them.
    import boto3  # noqa: F401
    import nilearn.maskers  # noqa: F401

    import data_prep.build  # noqa: F401
    from brainlm.data.loader import TrainLoader  # noqa: F401

    dests = {"local": str(work / "out")}
    server_cm = contextlib.nullcontext(None) if args.no_s3 else seaweedfs(work / "seaweedfs")
    with server_cm as server:
        if server is not None:
            dests["s3"] = create_bucket(f"bench-{int(time.time())}")
            result["s3"] = {"server": "SeaweedFS weed mini (loopback)", "endpoint": server.endpoint}
        log("build")
        build_rows = build_benchmarks(args, sources, dests, log)
        roots = {d: next(r["out"] for r in build_rows if r["source"] == "arrays" and r["dest"] == d) for d in dests}
        result["read_shards"] = roots
        log("read")
        read_rows = read_benchmarks(args, roots, log)
    result["build_runs"] = build_rows
    result["read_runs"] = read_rows
    build_metrics = (
        "wall_s",
        "recordings",
        "crops",
        "input_bytes",
        "shard_bytes",
        "recordings_per_s",
        "input_mb_per_s",
        "output_mb_per_s",
    )
    result["build_summary"] = summarise(build_rows, ("source", "dest", "workers"), build_metrics)
    result["read_summary"] = summarise(read_rows, ("reader", "store", "workers"), ("crops_per_s", "first_batch_s"))

    local_tl = [r for r in result["read_summary"] if r["reader"] == "TrainLoader" and r["store"] == "local"]
    best = max(local_tl, key=lambda r: r["crops_per_s"]["median"])
    demand = training_demand(args)
    supply = best["crops_per_s"]["median"]
    result["supply_vs_demand"] = {
        "supply_crops_per_s": supply,
        "supply_workers": best["workers"],
        "supply_per_worker_crops_per_s": supply / max(best["workers"], 1),
        "demand": demand,
        "loader_over_cpu_training": {k: supply / v for k, v in demand["cpu"].items()},
        "loader_over_h100_estimate": {k: supply / v["samples_per_s"] for k, v in demand["h100_estimate"].items()},
    }
    result["total_wall_s"] = time.perf_counter() - t_start
    print_tables(result)
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
