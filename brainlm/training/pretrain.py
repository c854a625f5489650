"""The pretraining loop: ``run(cfg, ds_config)`` is what ``launcher/pretrain.py`` and the tests call."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from brainlm.config import PretrainConfig, global_batch, lr_of, resolve_ds_config, warmup_steps
from brainlm.data.format import load_manifest
from brainlm.data.loader import TrainLoader, fixed_samples, sample_seed
from brainlm.eval.metrics import MASK_SEED, MASKING_CODES, R2Sums
from brainlm.exceptions import BrainLMError, ConfigError, ShardError
from brainlm.model import BrainLM
from brainlm.model.mae import sample_mask
from brainlm.training import engine as ds
from brainlm.training.checkpoint import Checkpointer
from brainlm.training.schedule import warmup_cosine
from brainlm.training.tracking import Tracker, default_tracking_uri


class NonFiniteLossError(BrainLMError):
    """The loss became NaN or infinite."""


@dataclass
class RunResult:
    out_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # global mean loss per optimizer step taken in this run
    val_r2: dict[int, float] = field(default_factory=dict)
    model_dir: Path | None = None
    registered_version: int | None = None
    run_id: str | None = None


def git_sha() -> str:
    """The checkout's commit, or $BRAINLM_GIT_SHA (set when the container image is built without .git)."""
    if os.environ.get("BRAINLM_GIT_SHA"):
        return os.environ["BRAINLM_GIT_SHA"]
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
            ).stdout.strip()
            or "unknown"
        )
    except Exception:
        return "unknown"


def seeded_masks(seeds_B: torch.Tensor, num_parcels: int, num_patches: int, mask_ratio: float, masking: str):
    """One mask per sample from its own seed: masks do not depend on batch composition or world size."""
    rows = []
    for s in seeds_B.tolist():
        g = torch.Generator().manual_seed(int(s))
        rows.append(sample_mask(1, num_parcels, num_patches, mask_ratio, masking, generator=g))
    return torch.cat(rows)


def all_mean(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def run(cfg: PretrainConfig, ds_config: dict | str | Path = "ds_config.json") -> RunResult:
    """Train, checkpoint, validate, export and register; every rank calls this."""
    ctx = ds.init_distributed()
    try:
        return _run(cfg, ds_config, ctx)
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def _run(cfg: PretrainConfig, ds_config: dict | str | Path, ctx: ds.DistContext) -> RunResult:
    t_cfg = cfg.train
    if not isinstance(ds_config, dict):
        path = Path(ds_config)
        if not path.exists():
            raise ConfigError(f"--deepspeed {path}: no such file; the default lives at the repository root")
        ds_config = json.loads(path.read_text())
    manifest, root = load_manifest(cfg.data.shards)
    window = cfg.model.num_timepoints
    if manifest.crop < window:
        raise ShardError(
            f"{root}: crops of {manifest.crop} timepoints are shorter than model.num_timepoints={window}; "
            "rebuild with a larger --crop or lower model.num_timepoints"
        )
    # The atlas decides the parcel count.
    model_cfg = dataclasses.replace(cfg.model, num_parcels=manifest.atlas.num_parcels)
    R, N = model_cfg.num_parcels, model_cfg.num_patches
    torch.manual_seed(t_cfg.seed)  # identical initial weights on every rank
    model = BrainLM(model_cfg)
    world = ctx.world_size
    ds_resolved = resolve_ds_config(ds_config, cfg, world, ds.bf16_supported())
    warmup = warmup_steps(cfg)
    engine = ds.initialize(
        model,
        model.param_groups(cfg.optim.weight_decay),
        ds_resolved,
        lambda step: warmup_cosine(step, warmup, t_cfg.max_steps, cfg.optim.min_lr_ratio),
    )
    dtype = torch.bfloat16 if ds_resolved.get("bf16", {}).get("enabled") else torch.float32
    out_dir = Path(t_cfg.out_dir)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(out_dir, t_cfg.keep_last, ctx.rank)
    model_dict = model_cfg.to_dict()

    start_step, run_id = 0, None
    resume_from = ckpt.latest() if t_cfg.resume == "auto" else (Path(t_cfg.resume) if t_cfg.resume else None)
    if resume_from is not None:
        meta = ckpt.load(engine, resume_from, model_dict)
        start_step, run_id = meta["step"], meta.get("mlflow_run_id")
        if ctx.is_main:
            print(f"resumed from {resume_from} at step {start_step}", flush=True)
        if start_step >= t_cfg.max_steps and (out_dir / "model" / "config.json").exists():
            if ctx.is_main:
                print(
                    f"{out_dir} is already complete ({start_step} steps, model in {out_dir / 'model'}); "
                    "raise train.max_steps to train on",
                    flush=True,
                )
            return RunResult(out_dir=out_dir, steps=start_step, model_dir=out_dir / "model", run_id=run_id)
    accum, mb = t_cfg.grad_accum, t_cfg.micro_batch_size
    loader = TrainLoader(
        manifest,
        root,
        cfg.data.train_split,
        mb,
        window,
        t_cfg.seed,
        ctx.rank,
        world,
        cfg.data.num_workers,
        cfg.data.prefetch,
        start=start_step * accum,
    )
    val_signal, val_seeds = _validation_set(cfg, manifest, root, window, ctx)
    coords_R3 = torch.tensor(manifest.atlas.coords(), device=ctx.device, dtype=dtype)

    gb = global_batch(cfg, world)
    steps_per_epoch = cfg.data.steps_per_epoch or max(1, math.ceil(manifest.num_samples(cfg.data.train_split) / gb))
    flops = model.flops_per_sample(model_cfg.mask_ratio, R)
    peak = t_cfg.peak_tflops or ds.peak_tflops(ctx.device)
    tracker = None
    if ctx.is_main:
        uri = cfg.tracking.tracking_uri or default_tracking_uri(out_dir)
        artifacts = None  # a server decides its own artifact store; a local sqlite store keeps them beside it
        if uri.startswith("sqlite:///"):
            artifacts = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
        tracker = Tracker(uri, cfg.tracking.experiment, cfg.tracking.enabled, artifacts)
        tracker.start(
            cfg.tracking.run_name or out_dir.name,
            {"recipe": cfg.to_dict(), "ds": ds_resolved, "world_size": world, "num_parcels": R},
            {"git_sha": git_sha(), "manifest_sha256": manifest.plan_sha256, "shards": str(root)},
            resume_run_id=run_id,
        )
        print(
            f"pretrain: {model.num_params() / 1e6:.2f}M params ({cfg.preset}), {R} parcels x {window} timepoints, "
            f"{world} rank(s), global batch {gb} ({mb} x {accum} x {world}), lr {lr_of(cfg, world):.2e}, "
            f"{steps_per_epoch} steps/epoch, ZeRO {ds.zero_stage(engine)}, {dtype}, device {ctx.device}",
            flush=True,
        )

    result = RunResult(out_dir=out_dir, steps=start_step)
    last_log, window_samples, wait_time = time.time(), 0, 0.0
    engine.train()
    for step in range(start_step, t_cfg.max_steps):
        step_loss = 0.0
        for _ in range(accum):
            t0 = time.time()
            batch = next(loader)
            wait_time += time.time() - t0
            signal = batch["signal"].to(ctx.device, dtype=dtype, non_blocking=True)
            mask_BL = seeded_masks(batch["seed"], R, N, model_cfg.mask_ratio, model_cfg.masking).to(ctx.device)
            out = engine(signal, coords_R3, mask_BL=mask_BL)
            engine.backward(out.loss)
            engine.step()
            step_loss += float(out.loss.detach()) / accum
        window_samples += gb
        loss = all_mean(step_loss, ctx.device)
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"step {step + 1}: the loss is {loss}; stopping. Lower optim.base_lr (now "
                f"{cfg.optim.base_lr}), check the shards with `python -m data_prep inspect`, or resume from the "
                f"last checkpoint in {ckpt.folder}"
            )
        result.losses.append(loss)
        done = step + 1
        if ctx.is_main and (done % t_cfg.log_every == 0 or done == t_cfg.max_steps):
            elapsed = max(time.time() - last_log, 1e-9)
            sps = window_samples / elapsed
            grad_norm = engine.get_global_grad_norm()
            lr = engine.lr_scheduler.get_last_lr()[0]
            metrics = {
                "loss": loss,
                "lr": lr,
                "samples_per_s": sps,
                "tokens_per_s": sps * model_cfg.num_tokens,
                "data_wait": wait_time / elapsed,
                "memory_gib": ds.memory_gib(ctx.device),
                "epoch": done / steps_per_epoch,
            }
            if grad_norm is not None:
                metrics["grad_norm"] = float(grad_norm)
            mfu = ""
            if peak:
                metrics["mfu"] = sps * flops / (peak * 1e12 * world)
                mfu = f" | mfu {metrics['mfu']:6.1%}"
            print(
                f"step {done:>6}/{t_cfg.max_steps} | loss {loss:.4f} | lr {lr:.2e} | grad_norm "
                f"{metrics.get('grad_norm', float('nan')):.3f} | {sps:7.1f} samples/s | "
                f"{sps * model_cfg.num_tokens / 1e3:8.1f}k tokens/s{mfu} | data {metrics['data_wait']:5.1%} | "
                f"mem {metrics['memory_gib']:.2f} GiB",
                flush=True,
            )
            tracker.log_metrics(metrics, step=done)
            with open(out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": done, **metrics}) + "\n")
            last_log, window_samples, wait_time = time.time(), 0, 0.0
        if (t_cfg.val_every and done % t_cfg.val_every == 0) or done == t_cfg.max_steps:
            r2 = _validate(engine, model, val_signal, val_seeds, coords_R3, model_cfg.mask_ratio, dtype, ctx)
            result.val_r2[done] = r2
            if ctx.is_main:
                print(f"step {done:>6}/{t_cfg.max_steps} | val masked R^2 {r2:.4f} (pooled, fixed masks)", flush=True)
                tracker.log_metrics({"val_masked_r2": r2}, step=done)
                with open(out_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps({"step": done, "val_masked_r2": r2}) + "\n")
            engine.train()
        if (t_cfg.ckpt_every and done % t_cfg.ckpt_every == 0) or done == t_cfg.max_steps:
            ckpt.save(
                engine,
                done,
                {
                    "model": model_dict,
                    "recipe": cfg.to_dict(),
                    "world_size": world,
                    "mlflow_run_id": tracker.run_id if tracker else None,
                },
            )
        result.steps = done

    if t_cfg.export:
        result.model_dir = _export(engine, model_cfg, manifest, root, cfg, out_dir, ctx)
    if ctx.is_main:
        result.run_id = tracker.run_id
        if result.model_dir is not None:
            _log_reconstruction_figure(result.model_dir, val_signal, coords_R3, out_dir, tracker)
            tracker.log_artifact(result.model_dir / "config.json", "export")
            if cfg.tracking.register_as:
                result.registered_version = tracker.register(
                    result.model_dir,
                    cfg.tracking.register_as,
                    cfg.tracking.alias,
                    {"manifest_sha256": manifest.plan_sha256, "git_sha": git_sha(), "preset": cfg.preset},
                )
        tracker.end()
    return result


def _validation_set(cfg: PretrainConfig, manifest, root: str, window: int, ctx: ds.DistContext):
    """This rank's share of the fixed validation windows, and their mask seeds."""
    split = cfg.data.val_split if manifest.num_samples(cfg.data.val_split) else cfg.data.train_split
    count = max(ctx.world_size, cfg.train.val_samples // ctx.world_size * ctx.world_size)
    signal, _ = fixed_samples(manifest, root, split, count, window)
    usable = signal.shape[0] // ctx.world_size * ctx.world_size  # equal work per rank (ZeRO-3 needs it)
    idx = list(range(ctx.rank, usable, ctx.world_size))
    # The evaluation protocol's masks (brainlm reconstruct): window i of the split gets the same mask in both.
    code = MASKING_CODES[cfg.model.masking]
    seeds = torch.tensor([sample_seed(MASK_SEED, code, i) for i in idx], dtype=torch.int64)
    return signal[idx], seeds


@torch.no_grad()
def _validate(engine, model: BrainLM, signal, seeds, coords_R3, mask_ratio: float, dtype, ctx) -> float:
    engine.eval()
    sums = R2Sums()
    R = signal.shape[1]
    for i in range(0, signal.shape[0], 8):
        x = signal[i : i + 8].to(ctx.device, dtype=dtype)
        mask = seeded_masks(seeds[i : i + 8], R, model.config.num_patches, mask_ratio, model.config.masking).to(
            ctx.device
        )
        out = engine(x, coords_R3, mask_BL=mask)
        sums.add(out.pred_BLP.float(), model.patchify(x.float()), out.mask_BL)
    total = sums.tensor().to(ctx.device)
    dist.all_reduce(total)
    return R2Sums.from_tensor(total.cpu()).r2


def _export(engine, model_cfg, manifest, root: str, cfg: PretrainConfig, out_dir: Path, ctx) -> Path | None:
    state = ds.full_state_dict(engine)
    target = out_dir / "model"
    if ctx.is_main:
        model = BrainLM(model_cfg)
        model.load_state_dict(state)
        model.save_pretrained(
            target,
            scaling=manifest.scaling,
            extra={
                "atlas": dataclasses.asdict(manifest.atlas),
                "tr": manifest.tr,
                "shards": str(root),
                "manifest_sha256": manifest.plan_sha256,
                "preset": cfg.preset,
                "steps": cfg.train.max_steps,
                "git_sha": git_sha(),
            },
        )
        print(f"exported {target} (model.safetensors, config.json, scaling.json, extra.json)", flush=True)
    dist.barrier()
    return target


def _log_reconstruction_figure(model_dir: Path, val_signal, coords_R3, out_dir: Path, tracker: Tracker) -> None:
    """True vs reconstructed signals of one validation crop, for the run's artifacts."""
    try:
        from brainlm.eval.plots import reconstruction_figure

        path = reconstruction_figure(
            BrainLM.from_pretrained(model_dir), val_signal[:1], coords_R3.float().cpu(), out_dir / "reconstruction.png"
        )
        tracker.log_artifact(path, "figures")
    except Exception as err:  # a figure must never fail a finished run
        print(f"warning: reconstruction figure failed ({type(err).__name__}: {err})", file=sys.stderr)
