"""Benchmark the BrainLM model: training-step throughput and MFU, beside Hugging Face ViTMAE; memory.

What it measures, in one run:
1. The peak rate of a large matmul (fp32 on CPU; the run's dtype too), the denominator of MFU.
2. Training steps (forward, backward, AdamW) of a preset (default `13m`, 424 parcels x 200 timepoints =
   4,240 tokens, mask 0.75, batch 8): samples/s, tokens/s, achieved FLOP/s from `flops_per_sample`, MFU.
3. The same step of Hugging Face `transformers` ViTMAEForPreTraining at the same width, depth, heads,
   MLP, decoder and mask ratio. ViTMAE needs a square image (its sin-cos table and `patchify` assume
   one) and 4,240 is not a square, so it gets the closest square layout: a 65 x 65 "image" with 20
   channels and 1 x 1 patches, i.e. 4,225 patches of 20 values (0.35% fewer tokens than BrainLM).
   It runs its SDPA attention (separate q, k, v projections); BrainLM runs its fused qkv + SDPA.
4. Peak memory of one forward + backward per attention backend (sdpa vs math; on CUDA sdpa vs
   xformers vs math), each in a fresh subprocess: on CPU the resident-set high-water mark (VmHWM, the
   per-process ru_maxrss) and its growth over the RSS before the step, on CUDA
   torch.cuda.max_memory_allocated and its growth over the memory allocated before the step.

On CPU the run first sets glibc's malloc to keep freed memory (mallopt M_MMAP_MAX=0,
M_TRIM_THRESHOLD=2 GiB; `--no-malloc-tuning` turns it off): otherwise every step maps and page-faults
fresh memory for its large activations, ~4% of a 13m step on the 2-core machine we measured. A CPU
training job gets the same from MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647 in its environment.

Shared machine? `--threads 1 --cpu-time` times one thread by its CPU time, which other jobs barely move.

Usage:
    python -m benchmarks.bench_model --out bench_model_cpu.json             # CPU, fp32
    python -m benchmarks.bench_model --device cuda --dtype bf16 --batch-size 64 --peak-tflops 989 \
        --backends sdpa,xformers --out bench_model_gpu.json                  # GPU (H100 bf16 peak)
transformers is not a dependency of brainlm: `pip install transformers` for the comparison, or pass
`--skip-hf`.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import ROOT, command_line
from brainlm.exceptions import ConfigError
from brainlm.model import BrainLM, ModelConfig, get_preset

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Wall clock by default; `--cpu-time` (one thread) switches to the thread's CPU time, which a shared
# machine's other tenants do not inflate: 2 OpenMP threads wait at every barrier for a preempted peer.
CLOCK: Callable[[], float] = time.perf_counter


def tune_malloc() -> bool:
    """Keep freed heap memory in glibc (no mmap, no trim) so steps reuse pages; False if not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def machine() -> dict[str, Any]:
    """CPU model, core count, torch build: what a reader needs to compare numbers."""
    name = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": name,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, reps: int) -> float:
    """Best FLOP/s of a size x size matmul over `reps` timed runs."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(reps):
        sync(device)
        start = CLOCK()
        torch.mm(a, b, out=out)
        sync(device)
        best = min(best, CLOCK() - start)
    return 2 * size**3 / best


def synthetic_batch(config: ModelConfig, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    signal_BRT = torch.randn(batch, config.num_parcels, config.num_timepoints, generator=g)
    coords_R3 = (torch.rand(config.num_parcels, 3, generator=g) - 0.5) * 140  # MNI mm
    return signal_BRT.to(device), coords_R3.to(device)


def time_steps(step: Callable[[], None], warmup: int, steps: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync(device)
        start = CLOCK()
        step()
        sync(device)
        times.append(CLOCK() - start)
    return times


def autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def brainlm_step(config: ModelConfig, batch: int, device: torch.device, dtype: torch.dtype) -> Callable[[], None]:
    torch.manual_seed(0)
    model = BrainLM(config).to(device).train()
    optimizer = torch.optim.AdamW(model.param_groups(0.05), lr=1e-4)
    signal_BRT, coords_R3 = synthetic_batch(config, batch, device)

    def step() -> None:
        with autocast(device, dtype):
            loss = model(signal_BRT, coords_R3).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def hf_vitmae(config: ModelConfig, attn_implementation: str = "sdpa") -> tuple[torch.nn.Module, int, int]:
    """ViTMAEForPreTraining sized like `config`, on the closest square layout: (model, side, tokens)."""
    try:
        from transformers import ViTMAEConfig, ViTMAEForPreTraining
    except ImportError as e:
        raise SystemExit(
            "the Hugging Face comparison needs transformers: `pip install transformers`, or pass --skip-hf"
        ) from e
    side = int(config.num_tokens**0.5)  # 4,240 tokens -> 65 x 65 = 4,225 patches
    hf_config = ViTMAEConfig(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        intermediate_size=config.mlp_dim,
        decoder_hidden_size=config.decoder_hidden_size,
        decoder_num_hidden_layers=config.decoder_num_layers,
        decoder_num_attention_heads=config.decoder_num_heads,
        decoder_intermediate_size=config.decoder_mlp_dim,
        mask_ratio=config.mask_ratio,
        image_size=side,
        patch_size=1,
        num_channels=config.patch_size,  # 1 x 1 patches of P channels: P values per token
        layer_norm_eps=config.layer_norm_eps,
    )
    hf_config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    return ViTMAEForPreTraining(hf_config), side, side * side


def hf_step(config: ModelConfig, batch: int, device: torch.device, dtype: torch.dtype) -> Callable[[], None]:
    model, side, _ = hf_vitmae(config)
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    pixels = torch.randn(batch, config.patch_size, side, side, generator=torch.Generator().manual_seed(0))
    pixels = pixels.to(device)

    def step() -> None:
        with autocast(device, dtype):
            loss = model(pixel_values=pixels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def proc_status_bytes(field: str) -> int:
    """A memory line of /proc/self/status (VmRSS: resident now, VmHWM: resident high-water mark)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_child(args: argparse.Namespace) -> None:
    """In a fresh process: one forward + backward with `--memory-child` as backend; print JSON."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    config = get_preset(args.preset, attention_backend=args.memory_child, mask_ratio=args.mask_ratio)
    model = BrainLM(config).to(device).train()
    signal_BRT, coords_R3 = synthetic_batch(config, args.memory_batch_size, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = proc_status_bytes("VmRSS")
    with autocast(device, dtype):
        loss = model(signal_BRT, coords_R3).loss
    loss.backward()
    sync(device)
    # VmHWM, not ru_maxrss: Linux carries the parent's high-water mark into ru_maxrss across fork + exec,
    # so a child of the (large) benchmark process would report the parent's peak.
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else proc_status_bytes("VmHWM")
    print(json.dumps({"backend": args.memory_child, "peak_bytes": peak, "step_bytes": peak - before}))


def measure_memory(args: argparse.Namespace, backend: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.bench_model", "--memory-child", backend, "--device", args.device]
    cmd += ["--dtype", args.dtype]
    cmd += ["--preset", args.preset, "--mask-ratio", str(args.mask_ratio)]
    cmd += ["--memory-batch-size", str(args.memory_batch_size)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode:
        return {"backend": backend, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(name: str, times: list[float], batch: int, tokens: int, flops_per_sample: float | None) -> dict:
    best, median = min(times), statistics.median(times)
    row: dict[str, Any] = {
        "model": name,
        "step_s_best": best,
        "step_s_median": median,
        "step_s_all": times,
        "samples_per_s": batch / best,
        "tokens_per_s": batch * tokens / best,
        "tokens_per_sample": tokens,
    }
    if flops_per_sample is not None:
        row["flops_per_sample"] = flops_per_sample
        row["achieved_flops_best"] = batch * flops_per_sample / best
        row["achieved_flops_median"] = batch * flops_per_sample / median
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="13m", help="model preset (default 13m, the paper's model)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="bf16: autocast")
    parser.add_argument(
        "--backends", default="sdpa", help="comma-separated attention backends to time (sdpa, xformers, math)"
    )
    parser.add_argument(
        "--memory-backends",
        default=None,
        help="backends for the memory measurement (default: sdpa,math; +xformers on CUDA)",
    )
    parser.add_argument("--memory-batch-size", type=int, default=2, help="batch of the memory measurement")
    parser.add_argument("--peak-tflops", type=float, default=None, help="vendor peak for GPU MFU (H100 bf16: 989)")
    parser.add_argument("--matmul-size", type=int, default=None, help="default 4096 on CPU, 8192 on CUDA")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time by the thread's CPU time (needs --threads 1): robust on a machine shared with other jobs",
    )
    parser.add_argument("--skip-hf", action="store_true", help="skip the Hugging Face ViTMAE comparison")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--no-malloc-tuning", action="store_true", help="leave glibc malloc at its defaults")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per memory subprocess")
    parser.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        if args.device != "cpu" or torch.get_num_threads() != 1:
            parser.error("--cpu-time measures one CPU thread: pass --device cpu --threads 1")
        global CLOCK
        CLOCK = time.thread_time
    malloc_tuned = args.device == "cpu" and not args.no_malloc_tuning and tune_malloc()
    if args.memory_child:
        memory_child(args)
        return {}
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    args.matmul_size = args.matmul_size or (8192 if device.type == "cuda" else 4096)
    base = get_preset(args.preset, mask_ratio=args.mask_ratio)
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "machine": machine(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "memory_child"},
        "malloc_tuned": malloc_tuned,
        "clock": "thread CPU time" if args.cpu_time else "wall",
        "config": base.to_dict(),
        "params": BrainLM(base).num_params(),
    }

    # The matmul peak before and after the model runs: the machine may be shared, so keep the best.
    peaks = {"fp32": [matmul_peak(device, torch.float32, args.matmul_size, 5)]}
    if dtype != torch.float32:
        peaks[args.dtype] = [matmul_peak(device, dtype, args.matmul_size, 5)]

    rows, errors = [], {}
    for backend in args.backends.split(","):
        config = get_preset(args.preset, mask_ratio=args.mask_ratio, attention_backend=backend)
        try:
            step = brainlm_step(config, args.batch_size, device, dtype)
            times = time_steps(step, args.warmup, args.steps, device)
        except ConfigError as e:  # e.g. xformers missing: report it, time the others
            errors[f"brainlm[{backend}]"] = str(e)
            print(f"brainlm[{backend}]: skipped: {e}", flush=True)
            continue
        flops = BrainLM(config).flops_per_sample()
        rows.append(summarise(f"brainlm[{backend}]", times, args.batch_size, config.num_tokens, flops))
        print(f"brainlm[{backend}]: steps {', '.join(f'{t:.2f}' for t in times)} s", flush=True)
    if not args.skip_hf:
        hf_model, _, hf_tokens = hf_vitmae(base)
        result["hf"] = {
            "transformers": importlib.metadata.version("transformers"),
            "attn_implementation": hf_model.config._attn_implementation,
            "params": sum(p.numel() for p in hf_model.parameters()),
            "layout": "65 x 65 image, 20 channels, 1 x 1 patches: 4,225 tokens of 20 values",
        }
        del hf_model
        times = time_steps(hf_step(base, args.batch_size, device, dtype), args.warmup, args.steps, device)
        rows.append(summarise("hf-vitmae[sdpa]", times, args.batch_size, hf_tokens, None))
        print(f"hf-vitmae[sdpa]: steps {', '.join(f'{t:.2f}' for t in times)} s", flush=True)
    for name in peaks:
        peaks[name].append(matmul_peak(device, DTYPES[name], args.matmul_size, 5))

    peak = {name: max(values) for name, values in peaks.items()}
    result["matmul_peak_flops"] = peak
    result["matmul_peak_samples"] = peaks
    if args.peak_tflops:
        result["vendor_peak_flops"] = args.peak_tflops * 1e12
    denominator = args.peak_tflops * 1e12 if args.peak_tflops else peak[args.dtype]
    for row in rows:
        if "achieved_flops_best" in row:
            row["mfu_best"] = row["achieved_flops_best"] / denominator
            row["mfu_median"] = row["achieved_flops_median"] / denominator
            row["vs_fp32_matmul_best"] = row["achieved_flops_best"] / peak["fp32"]
    if not args.skip_hf and len(rows) > 1:
        hf = rows[-1]
        for row in rows[:-1]:
            row["speedup_vs_hf_samples_per_s"] = row["samples_per_s"] / hf["samples_per_s"]
    result["throughput"] = rows
    result["errors"] = errors

    if not args.skip_memory:
        backends = args.memory_backends or ("sdpa,xformers,math" if device.type == "cuda" else "sdpa,math")
        result["memory"] = [measure_memory(args, b) for b in backends.split(",")]

    result["load_average_at_end"] = os.getloadavg()
    print_table(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return result


def print_table(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(f"\n{result['date']}  {m['cpu']} ({m['cpu_count']} CPUs, {m['torch_threads']} threads)  torch {m['torch']}")
    print(f"{result['command']}")
    peaks = ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in result["matmul_peak_flops"].items())
    print(
        f"matmul peak ({result['args']['matmul_size']}^2): {peaks}; malloc tuned: {result['malloc_tuned']}; "
        f"clock: {result['clock']}; dtype: {result['args']['dtype']}"
    )
    print(
        f"{'model':<18}{'step s (best/med)':>20}{'samples/s':>11}{'tokens/s':>11}{'GFLOP/s':>9}{'MFU':>7}"
        f"{'/fp32 mm':>9}{'vs HF':>7}"
    )
    for row in result["throughput"]:
        gflops = f"{row['achieved_flops_best'] / 1e9:.0f}" if "achieved_flops_best" in row else "-"
        mfu = f"{row['mfu_best']:.0%}" if "mfu_best" in row else "-"
        vs_fp32 = f"{row['vs_fp32_matmul_best']:.0%}" if "vs_fp32_matmul_best" in row else "-"
        vs_hf = f"{row['speedup_vs_hf_samples_per_s']:.2f}x" if "speedup_vs_hf_samples_per_s" in row else "-"
        steps = f"{row['step_s_best']:.2f} / {row['step_s_median']:.2f}"
        print(
            f"{row['model']:<18}{steps:>20}{row['samples_per_s']:>11.2f}{row['tokens_per_s']:>11.0f}"
            f"{gflops:>9}{mfu:>7}{vs_fp32:>9}{vs_hf:>7}"
        )
    for mem in result.get("memory", []):
        if "error" in mem:
            print(f"memory[{mem['backend']}]: failed: {mem['error']}")
        else:
            print(
                f"memory[{mem['backend']}] fwd+bwd, batch {result['args']['memory_batch_size']}: "
                f"+{mem['step_bytes'] / 2**30:.2f} GiB (peak {mem['peak_bytes'] / 2**30:.2f} GiB)"
            )


if __name__ == "__main__":
    main()
