"""Benchmark pretraining on this machine: throughput per preset, rank count and ZeRO stage; ZeRO's memory.

What it measures, in one run:
1. Training throughput through the real entry point, `launcher/pretrain.py` under `torchrun
   --nproc_per_node N` (or `deepspeed --num_gpus N`, --launcher deepspeed), fp32 on CPU (gloo), each run
   with its own DeepSpeed JSON (the repository's ds_config.json with `zero_optimization.stage` set).
   Read from the run's `metrics.jsonl` (rank 0, one line per step with --train.log_every 1): samples/s,
   tokens/s, the data-wait share (time in `next(loader)` / step time) and rank 0's peak RSS. The first
   step (warm-up) is left out; best / median / worst over the remaining steps. Default matrix:
   - `debug`, window 200 (3,000 tokens), micro batch 8 per rank: 1 and 2 ranks x ZeRO 0, 1, 2;
   - `13m`, window 100 (--model.num_timepoints 100: 1,500 tokens, half the paper's window, to keep the
     steps short), micro batch 8 per rank: 1 rank ZeRO 0, 2 ranks x ZeRO 0, 1, 2;
   - `13m`, window 200 (the paper's window, 3,000 tokens), micro batch 8, 1 rank ZeRO 0: the CPU figure
     that benchmarks/bench_data_prep.py sets against the loader.
   The shard set: `python -m data_prep synth --subjects 40` + `build` (300 parcels: the atlas decides, the
   13m preset's 424 is the paper's atlas). Every run: --tracking.enabled false --train.val_every 0
   --train.ckpt_every 0 --train.export false --train.val_samples <ranks> (the end-of-run validation and
   checkpoint still happen: outside the per-step figures).
2. Per-rank memory of model + optimizer per ZeRO stage, measured directly: under the same launcher, each
   rank builds the DeepSpeed engine for a preset (default 111m, 300 parcels) exactly as training does
   (`brainlm.training.engine.initialize`, the repository's ds_config.json with the stage set), takes one
   step (so that AdamW's states exist at every stage), and reports the bytes of: the module's parameters
   on this rank (ZeRO-3: its partition), DeepSpeed's fp32 master partition (ZeRO 1/2:
   single_partition_of_fp32_groups; ZeRO 3: fp32_partitioned_groups_flat; ZeRO 0: none, the parameters
   are the master copy) and the optimizer state tensors (exp_avg, exp_avg_sq); plus the process's RSS
   growth from before the model was built (VmRSS after initialize, VmHWM after the step: this one also
   holds gradients, the step's activations and communication buffers).

The machine may be shared: each run records the share of the CPU other processes took while it ran; a
run above --max-foreign is repeated once (unless the load is persistent) and flagged.

    python -m benchmarks.bench_pretrain --out bench-results/pretrain.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import (
    ROOT,
    VENV_BIN,
    CpuMonitor,
    command_line,
    free_port,
    machine,
    now_utc,
    spread,
    wait_for_quiet,
    write_json,
)


@dataclass
class RunSpec:
    preset: str
    window: int
    ranks: int
    stage: int
    steps: int
    micro_batch: int = 8
    loader_workers: int = 1  # data.num_workers (the recipe default)

    @property
    def name(self) -> str:
        return f"{self.preset}-w{self.window}-r{self.ranks}-z{self.stage}"


def default_matrix(args) -> list[RunSpec]:
    runs = []
    for ranks in (1, 2):
        for stage in (0, 1, 2):
            runs.append(RunSpec("debug", 200, ranks, stage, args.debug_steps))
    runs.append(RunSpec("13m", 100, 1, 0, args.steps_13m))
    for stage in (0, 1, 2):
        runs.append(RunSpec("13m", 100, 2, stage, args.steps_13m))
    runs.append(RunSpec("13m", 200, 1, 0, args.steps_13m_w200))
    return runs


def ds_json(work: Path, stage: int) -> Path:
    cfg = json.loads((ROOT / "ds_config.json").read_text())
    cfg["zero_optimization"] = {"stage": stage}
    path = work / f"ds_zero{stage}.json"
    path.write_text(json.dumps(cfg, indent=2))
    return path


def launch(launcher: str, ranks: int, script: str, script_args: list[str], module: bool = False) -> list[str]:
    """The launcher command for ``script`` (a file; with ``module``, a module run as ``python -m`` from ROOT)."""
    port = str(free_port())
    what = ["--module", script] if module else [script]
    if launcher == "deepspeed":
        return [str(VENV_BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", port, *what, *script_args]
    return [
        str(VENV_BIN / "torchrun"),
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(ranks),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        port,
        *what,
        *script_args,
    ]


def env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}


def train_once(spec: RunSpec, args, work: Path, attempt: int) -> dict[str, Any]:
    out_dir = work / "runs" / f"{spec.name}-a{attempt}"
    pretrain_args = [
        "--deepspeed",
        str(ds_json(work, spec.stage)),
        "--model.preset",
        spec.preset,
        "--model.num_timepoints",
        str(spec.window),
        "--data.shards",
        str(args.shards),
        "--data.num_workers",
        str(spec.loader_workers),
        "--train.micro_batch_size",
        str(spec.micro_batch),
        "--train.max_steps",
        str(spec.steps),
        "--train.log_every",
        "1",
        "--train.val_every",
        "0",
        "--train.ckpt_every",
        "0",
        "--train.export",
        "false",
        "--train.val_samples",
        str(spec.ranks),
        "--tracking.enabled",
        "false",
        "--train.out_dir",
        str(out_dir),
    ]
    cmd = launch(args.launcher, spec.ranks, "launcher/pretrain.py", pretrain_args)
    with CpuMonitor() as mon:
        done = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=args.timeout)
    row: dict[str, Any] = {**asdict(spec), "name": spec.name, "attempt": attempt, **mon.record()}
    row["command"] = " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))
    if done.returncode:
        row["error"] = (done.stdout[-2000:] + done.stderr[-3000:]).strip()
        return row
    header = next((x for x in done.stdout.splitlines() if x.startswith("pretrain:")), "")
    row["header"] = header
    steps = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "samples_per_s" in s]
    row["steps_all"] = steps
    timed = steps[args.skip_steps :] or steps
    row["samples_per_s"] = spread([s["samples_per_s"] for s in timed])
    row["tokens_per_s"] = spread([s["tokens_per_s"] for s in timed])
    row["step_s"] = spread([spec.micro_batch * spec.ranks / s["samples_per_s"] for s in timed])
    row["data_wait_share"] = sum(s["data_wait"] for s in timed) / len(timed)
    row["rank0_peak_rss_gib"] = max(s["memory_gib"] for s in steps)
    row["tokens_per_sample"] = round(timed[0]["tokens_per_s"] / timed[0]["samples_per_s"])
    row["disturbed"] = row["foreign_cpu_share"] > args.max_foreign
    return row


def should_retry(rows: list[dict]) -> bool:
    """Repeat a disturbed run once, unless the two runs before it were disturbed too (a persistent load)."""
    before = rows[-3:-1]
    return rows[-1].get("disturbed", False) and not (len(before) == 2 and all(r.get("disturbed") for r in before))


def throughput(args, work: Path, log) -> list[dict]:
    rows = []
    for spec in default_matrix(args):
        if args.only and not any(spec.name.startswith(o) for o in args.only.split(",")):
            continue
        for attempt in range(2):
            row = train_once(spec, args, work, attempt)
            rows.append(row)
            if "error" in row:
                log(f"  {spec.name}: FAILED\n{row['error']}")
                break
            log(
                f"  {spec.name:<18} {row['samples_per_s']['median']:7.2f} samples/s (median of "
                f"{row['samples_per_s']['n']} steps, range {row['samples_per_s']['range_pct']:.0f}%), "
                f"{row['tokens_per_s']['median']:9.0f} tokens/s, data wait {row['data_wait_share']:.1%}, "
                f"rank-0 RSS {row['rank0_peak_rss_gib']:.2f} GiB, wall {row['wall_s']:.0f} s, "
                f"others used {row['foreign_cpu_share']:.0%} of the CPU"
            )
            if not should_retry(rows):
                break
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """One row per configuration (the undisturbed attempt if any, else the faster), with ratios."""
    best: dict[str, dict] = {}
    for r in rows:
        if "error" in r:
            continue
        cur = best.get(r["name"])
        key = (not r["disturbed"], r["samples_per_s"]["median"])
        if cur is None or key > (not cur["disturbed"], cur["samples_per_s"]["median"]):
            best[r["name"]] = r
    out = []
    for r in best.values():
        row = {
            k: r[k]
            for k in (
                "name",
                "preset",
                "window",
                "ranks",
                "stage",
                "micro_batch",
                "steps",
                "tokens_per_sample",
                "samples_per_s",
                "tokens_per_s",
                "step_s",
                "data_wait_share",
                "rank0_peak_rss_gib",
                "foreign_cpu_share",
                "disturbed",
                "command",
            )
        }
        one = best.get(f"{r['preset']}-w{r['window']}-r1-z{r['stage']}") or best.get(
            f"{r['preset']}-w{r['window']}-r1-z0"
        )
        z0 = best.get(f"{r['preset']}-w{r['window']}-r{r['ranks']}-z0")
        med = r["samples_per_s"]["median"]
        row["vs_1_rank"] = med / one["samples_per_s"]["median"] if one else None
        row["vs_zero0"] = med / z0["samples_per_s"]["median"] if z0 else None
        out.append(row)
    return out


# -- memory per ZeRO stage ----------------------------------------------------------------------------------


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one flat buffer count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _state_bytes(engine) -> dict[str, int]:
    import torch

    stage = int(engine.zero_optimization_stage())
    params = [getattr(p, "ds_tensor", None) if stage == 3 else p.data for p in engine.module.parameters()]
    opt = engine.optimizer
    if stage in (1, 2):
        master = list(opt.single_partition_of_fp32_groups)
    elif stage == 3:
        master = list(opt.fp32_partitioned_groups_flat)
    else:
        master = []
    inner = getattr(opt, "optimizer", opt) if stage else opt
    states = [v for st in inner.state.values() for v in st.values() if torch.is_tensor(v) and v.numel() > 1]
    out = {
        "params": _storage_bytes(params),
        "fp32_master": _storage_bytes(master),
        "optimizer_states": _storage_bytes(states),
    }
    out["total"] = sum(out.values())
    return out


def memory_child(args) -> None:
    """Run under the launcher: every rank builds the engine for one ZeRO stage, steps once, reports."""
    import torch
    import torch.distributed as dist

    from brainlm.model import BrainLM, get_preset
    from brainlm.training import engine as ds
    from brainlm.training.ds_config import resolve_ds_config
    from brainlm.training.recipe import load_recipe

    ctx = ds.init_distributed()
    cfg = load_recipe(None, {"model.preset": args.memory_preset, "train.micro_batch_size": 1})
    ds_cfg = json.loads((ROOT / "ds_config.json").read_text())
    ds_cfg["zero_optimization"] = {"stage": args.memory_stage}
    resolved = resolve_ds_config(ds_cfg, cfg, ctx.world_size, ds.bf16_supported())
    rss = {"before_model": _proc_status_bytes("VmRSS")}
    torch.manual_seed(0)
    model_cfg = get_preset(args.memory_preset, num_parcels=args.memory_parcels)
    model = BrainLM(model_cfg)
    num_params = model.num_params()
    rss["after_model"] = _proc_status_bytes("VmRSS")
    engine = ds.initialize(model, model.param_groups(0.05), resolved, lambda step: 1.0)
    rss["after_initialize"] = _proc_status_bytes("VmRSS")
    at_init = _state_bytes(engine)
    g = torch.Generator().manual_seed(ctx.rank)
    signal = torch.randn(1, args.memory_parcels, args.memory_timepoints, generator=g)
    coords = (torch.rand(args.memory_parcels, 3, generator=g) - 0.5) * 140
    out = engine(signal, coords)
    engine.backward(out.loss)
    engine.step()
    rss["after_step"] = _proc_status_bytes("VmRSS")
    rss["peak"] = _proc_status_bytes("VmHWM")
    after_step = _state_bytes(engine)
    mine = {
        "rank": ctx.rank,
        "world_size": ctx.world_size,
        "stage": int(engine.zero_optimization_stage()),
        "num_params": num_params,
        "bytes_at_initialize": at_init,
        "bytes_after_step": after_step,
        "rss_bytes": rss,
        "rss_growth_after_initialize": rss["after_initialize"] - rss["before_model"],
        "peak_rss_growth": rss["peak"] - rss["before_model"],
    }
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, mine)
    if ctx.is_main:
        Path(args.memory_child).write_text(json.dumps(gathered))
    dist.barrier()
    dist.destroy_process_group()


def memory(args, work: Path, log) -> list[dict]:
    rows = []
    for stage in args.memory_stages:
        out = work / f"memory-z{stage}.json"
        child_args = [
            "--memory-child",
            str(out),
            "--memory-stage",
            str(stage),
            "--memory-preset",
            args.memory_preset,
            "--memory-parcels",
            str(args.memory_parcels),
            "--memory-timepoints",
            str(args.memory_timepoints),
        ]
        cmd = launch(args.launcher, args.memory_ranks, "benchmarks.bench_pretrain", child_args, module=True)
        with CpuMonitor() as mon:
            done = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=args.timeout)
        if done.returncode or not out.exists():
            rows.append({"stage": stage, "error": (done.stdout[-2000:] + done.stderr[-3000:]).strip()})
            log(f"  memory ZeRO {stage}: FAILED\n{rows[-1]['error']}")
            continue
        ranks = json.loads(out.read_text())
        psi = ranks[0]["num_params"]
        n = args.memory_ranks
        # What ZeRO's paper predicts for fp32 training with Adam, per rank: parameters 4 psi (ZeRO-3: /N),
        # fp32 master copy 0 at stage 0 (the parameters are the master) else 4 psi / N, states 8 psi / N
        # from stage 1 on.
        expected = {
            "params": 4 * psi / (n if stage == 3 else 1),
            "fp32_master": 0 if stage == 0 else 4 * psi / n,
            "optimizer_states": 8 * psi / (n if stage >= 1 else 1),
        }
        expected["total"] = sum(expected.values())
        row = {
            "stage": stage,
            "preset": args.memory_preset,
            "parcels": args.memory_parcels,
            "ranks": n,
            "num_params": psi,
            "per_rank": ranks,
            "expected_bytes_per_rank": expected,
            "command": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd)),
            **mon.record(),
        }
        rows.append(row)
        r0 = ranks[0]["bytes_after_step"]
        log(
            f"  memory ZeRO {stage} ({args.memory_preset}, {n} ranks): rank 0 params {r0['params'] / 2**20:.0f} MiB"
            f" + fp32 master {r0['fp32_master'] / 2**20:.0f} MiB + optimizer states "
            f"{r0['optimizer_states'] / 2**20:.0f} MiB = {r0['total'] / 2**20:.0f} MiB; peak RSS growth "
            f"{ranks[0]['peak_rss_growth'] / 2**20:.0f} MiB"
        )
    base = next((r for r in rows if r.get("stage") == 0 and "error" not in r), None)
    for r in rows:
        if base and "error" not in r:
            b0, b = base["per_rank"][0], r["per_rank"][0]
            r["state_bytes_vs_zero0"] = b["bytes_after_step"]["total"] / b0["bytes_after_step"]["total"]
            r["peak_rss_growth_vs_zero0"] = b["peak_rss_growth"] / b0["peak_rss_growth"]
    return rows


def ensure_shards(args, work: Path, log) -> dict[str, Any]:
    if args.shards:
        return {"shards": str(args.shards), "built": False}
    cohort, shards = work / "cohort", work / "shards"
    synth = [sys.executable, "-m", "data_prep", "synth", "--out", str(cohort), "--subjects", str(args.subjects)]
    build = [sys.executable, "-m", "data_prep", "build", "--inputs", str(cohort), "--out", str(shards), "--quiet"]
    if not (shards / "manifest.json").exists():
        log(f"shards: {' '.join(synth[1:])} && {' '.join(build[1:])}")
        for cmd in (synth, build):
            subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    args.shards = shards
    return {
        "shards": str(shards),
        "built": True,
        "commands": [" ".join(["python", *synth[1:]]), " ".join(["python", *build[1:]])],
    }


def print_tables(result: dict) -> None:
    m = result["machine"]
    print(
        f"\n{result['date']}  {m['cpu']} ({m['cpu_count']} CPUs)  torch {m.get('torch')}  "
        f"deepspeed {m.get('deepspeed')}"
    )
    print(result["command"])
    print(
        f"\ntraining throughput, fp32, launcher {result['args']['launcher']} (median of steps 2..N; ratios of medians)"
    )
    print(
        f"{'preset':<7}{'win':>4}{'tok':>6}{'rk':>3}{'Z':>2}{'samples/s':>10}{'range':>7}{'tokens/s':>10}"
        f"{'step s':>8}{'data':>7}{'RSS GiB':>8}{'x 1rk':>7}{'x Z0':>6}{'others':>8}"
    )
    for r in result["summary"]:
        x1 = f"{r['vs_1_rank']:.2f}" if r["vs_1_rank"] else "-"
        xz = f"{r['vs_zero0']:.2f}" if r["vs_zero0"] else "-"
        print(
            f"{r['preset']:<7}{r['window']:>4}{r['tokens_per_sample']:>6}{r['ranks']:>3}{r['stage']:>2}"
            f"{r['samples_per_s']['median']:>10.2f}{r['samples_per_s']['range_pct']:>6.0f}%"
            f"{r['tokens_per_s']['median']:>10.0f}{r['step_s']['median']:>8.2f}{r['data_wait_share']:>7.1%}"
            f"{r['rank0_peak_rss_gib']:>8.2f}{x1:>7}{xz:>6}{r['foreign_cpu_share']:>8.0%}"
        )
    if result.get("memory"):
        print("\nper-rank memory of model + optimizer by ZeRO stage (rank 0, after one step; MiB)")
        print(
            f"{'Z':>2}{'params':>9}{'fp32 master':>12}{'opt states':>11}{'total':>8}{'expected':>9}"
            f"{'x Z0':>6}{'RSS growth':>11}{'peak growth':>12}{'x Z0':>6}"
        )
        for r in result["memory"]:
            if "error" in r:
                print(f"{r['stage']:>2} failed")
                continue
            b = r["per_rank"][0]["bytes_after_step"]
            mib = 2**20
            print(
                f"{r['stage']:>2}{b['params'] / mib:>9.0f}{b['fp32_master'] / mib:>12.0f}"
                f"{b['optimizer_states'] / mib:>11.0f}{b['total'] / mib:>8.0f}"
                f"{r['expected_bytes_per_rank']['total'] / mib:>9.0f}{r.get('state_bytes_vs_zero0', 1):>6.2f}"
                f"{r['per_rank'][0]['rss_growth_after_initialize'] / mib:>11.0f}"
                f"{r['per_rank'][0]['peak_rss_growth'] / mib:>12.0f}{r.get('peak_rss_growth_vs_zero0', 1):>6.2f}"
            )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a new temporary folder)")
    parser.add_argument("--shards", type=Path, help="a shard set (default: synth --subjects 40 + build)")
    parser.add_argument("--subjects", type=int, default=40, help="subjects of the synthetic cohort")
    parser.add_argument("--launcher", default="torchrun", choices=["torchrun", "deepspeed"])
    parser.add_argument("--debug-steps", type=int, default=8, help="steps per debug run (the first is warm-up)")
    parser.add_argument("--steps-13m", type=int, default=4, help="steps per 13m window-100 run")
    parser.add_argument("--steps-13m-w200", type=int, default=3, help="steps of the 13m window-200 run")
    parser.add_argument("--skip-steps", type=int, default=1, help="warm-up steps left out of the figures")
    parser.add_argument("--only", help="comma-separated run-name prefixes, e.g. debug,13m-w100-r2")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-preset", default="111m")
    parser.add_argument("--memory-parcels", type=int, default=300)
    parser.add_argument("--memory-timepoints", type=int, default=40, help="window of the one measured step")
    parser.add_argument("--memory-ranks", type=int, default=2)
    parser.add_argument("--memory-stages", default="0,1,2,3")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        help="first wait up to this many seconds for other processes to use less than --max-foreign of the CPU",
    )
    parser.add_argument("--max-foreign", type=float, default=0.25, help="flag/repeat runs above this share")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per launched run")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--memory-stage", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return {}
    args.memory_stages = [int(x) for x in args.memory_stages.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-pretrain-"))
    work.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    quiet = wait_for_quiet(args.max_foreign, args.wait_quiet, log)

    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "date": now_utc(),
        "command": command_line(),
        "machine": machine(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "work": str(work),
        "foreign_cpu_share_at_start": round(quiet, 3),
    }
    result["data"] = ensure_shards(args, work, log)
    if not args.skip_throughput:
        log("throughput")
        result["runs"] = throughput(args, work, log)
        result["summary"] = summarise(result["runs"])
    else:
        result["summary"] = []
    if not args.skip_memory:
        log("memory per ZeRO stage")
        result["memory"] = memory(args, work, log)
    result["total_wall_s"] = time.perf_counter() - t0
    print_tables(result)
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
