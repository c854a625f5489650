"""Pretraining in parts, as torchtitan lays it out: ``preflight`` (what the run is, checked before any process
group: the shard set, the model it trains, the DeepSpeed JSON), the builders (model, loader, validation set,
tracker), and a ``Trainer`` that steps, logs, validates, checkpoints and exports. ``run(cfg, ds_config)`` puts
them together; ``launcher/pretrain.py``, the scaling sweep's trials and the tests call it.

Masks come with the batches: the loader draws each sample's mask from the sample's seed (``MaskSpec``), in the
worker that reads it; validation windows carry the evaluation protocol's masks (``brainlm.protocol``).
One file of about 400 lines on purpose: the whole run reads in order, each part a short function or method.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from brainlm import atomic
from brainlm.data.format import Manifest, load_manifest
from brainlm.data.loader import MaskSpec, TrainLoader, fixed_samples
from brainlm.exceptions import ConfigError, NonFiniteLossError, ShardError
from brainlm.lock import FolderLock
from brainlm.masking import seeded_masks
from brainlm.model import BrainLM, ModelConfig, prior
from brainlm.model.io import trained_on
from brainlm.protocol import R2Sums, context_statistics, context_windows, protocol_seeds
from brainlm.tracking.env import default_tracking_uri, git_sha
from brainlm.tracking.runs import Tracker
from brainlm.training import engine as ds
from brainlm.training.checkpoint import Checkpointer
from brainlm.training.ds_config import read_ds_config, resolve_ds_config
from brainlm.training.recipe import PretrainConfig, global_batch, lr_of, warmup_steps
from brainlm.training.schedule import warmup_cosine


@dataclass
class RunResult:
    out_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # global mean loss per optimizer step taken in this run
    val_r2: dict[int, float] = field(default_factory=dict)
    model_dir: Path | None = None
    registered_version: int | None = None
    run_id: str | None = None


@dataclass
class Plan:
    """What a run is, known before any process group exists."""

    manifest: Manifest
    root: str
    model: ModelConfig  # the recipe's model with the atlas's parcel count
    ds_config: dict[str, Any]

    @property
    def num_parcels(self) -> int:
        return self.model.num_parcels


def preflight(cfg: PretrainConfig, ds_config: dict | str | Path) -> Plan:
    """Read the DeepSpeed JSON and the shard set's manifest and check they fit the recipe; raises before any work."""
    ds_json = read_ds_config(ds_config)
    manifest, root = load_manifest(cfg.data.shards)
    window = cfg.model.num_timepoints
    if manifest.crop < window:
        raise ShardError(
            f"{root}: crops of {manifest.crop} timepoints are shorter than model.num_timepoints={window}; rebuild "
            f"with a larger --crop or lower model.num_timepoints (to {manifest.crop} or less, a multiple of "
            f"model.patch_size {cfg.model.patch_size})"
        )
    if cfg.model.prior_context and manifest.crop <= window:
        raise ShardError(
            f"{root}: model.prior_context reads each training window's recording context, the rest of its crop, but "
            f"these crops ({manifest.crop} timepoints) are no longer than the window ({window}): no window would have "
            "any; rebuild with a larger --crop (e.g. twice the window, or a whole recording) or set "
            "model.prior_context 0"
        )
    # The atlas decides the parcel count.
    model_cfg = dataclasses.replace(cfg.model, num_parcels=manifest.atlas.num_parcels)
    return Plan(manifest, root, model_cfg, ds_json)


def apply_activation_checkpointing(model: BrainLM) -> None:
    """Recompute every block's activations in the backward pass (a training choice: the weights do not change)."""
    for block in [*model.blocks, *model.decoder_blocks]:
        block.activation_checkpointing = True


def build_model(cfg: PretrainConfig, plan: Plan) -> BrainLM:
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = BrainLM(plan.model)
    if cfg.train.init_from:
        init_weights(model, cfg.train.init_from)
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    return model


def init_weights(model: BrainLM, source: str) -> None:
    """Copy an exported model's weights into ``model`` (``train.init_from``): every parameter must be there with
    its shape; the prior's statistics are not taken (they belong to the source's atlas and are refitted here)."""
    from brainlm.tracking.registry import resolve_model

    folder = resolve_model(source)
    loaded = BrainLM.from_pretrained(folder)
    state = {k: v for k, v in loaded.state_dict().items() if k not in BrainLM.PRIOR_BUFFERS}
    own = {k: v for k, v in model.state_dict().items() if k not in BrainLM.PRIOR_BUFFERS}
    missing, extra = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or extra or shapes:
        problems = "; ".join(
            part for part in (
                f"not in it: {', '.join(missing[:4])}" if missing else "",
                f"not in the recipe's model: {', '.join(extra[:4])}" if extra else "",
                f"other shapes (source vs recipe): {', '.join(shapes[:4])}" if shapes else "",
            ) if part
        )  # fmt: skip
        raise ConfigError(
            f"train.init_from {source}: its architecture is not the recipe's model ({problems}); set the recipe's "
            f"model section to the source's (its config.json: {folder / 'config.json'})"
        )
    model.load_state_dict(state, strict=False)
    model.extra = {"trained_on": trained_on(loaded.extra)}  # the export adds this run to the source's history


def fit_prior(model: BrainLM, cfg: PretrainConfig, plan: Plan) -> dict[str, torch.Tensor]:
    """Fit the decoder's Gaussian prior on the training split (every rank reads the same windows); returns its
    fp32 statistics, which the export writes (a bf16 engine casts the module's buffers to bf16)."""
    windows, _ = fixed_samples(
        plan.manifest, plan.root, cfg.data.train_split, prior.FIT_WINDOWS, plan.model.num_timepoints
    )
    model.fit_prior(windows, torch.tensor(plan.manifest.atlas.coords(), dtype=torch.float32))
    return {name: getattr(model, name).detach().clone() for name in BrainLM.PRIOR_BUFFERS}


def build_loader(cfg: PretrainConfig, plan: Plan, ctx: ds.DistContext, start_step: int) -> TrainLoader:
    c = plan.model
    return TrainLoader(
        plan.manifest,
        plan.root,
        cfg.data.train_split,
        cfg.train.micro_batch_size,
        c.num_timepoints,
        cfg.train.seed,
        ctx.rank,
        ctx.world_size,
        cfg.data.num_workers,
        cfg.data.prefetch,
        start=start_step * cfg.train.grad_accum,
        masks=MaskSpec(c.num_patches, c.mask_ratio, c.masking),
        on_corrupt=cfg.data.on_corrupt,
        context=bool(c.prior_context),
    )


@dataclass
class ValidationSet:
    """This rank's share of the fixed validation windows and their masks (the evaluation protocol's), and each
    window's recording context (the protocol's: the rest of its recording) for a prior that reads it."""

    signal: torch.Tensor
    masks: torch.Tensor
    context: tuple[torch.Tensor, torch.Tensor] | None = None

    def context_of(self, rows: slice, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self.context is None else (self.context[0][rows].to(device), self.context[1][rows].to(device))


def build_validation(cfg: PretrainConfig, plan: Plan, ctx: ds.DistContext) -> ValidationSet:
    m = plan.manifest
    split = cfg.data.val_split if m.num_samples(cfg.data.val_split) else cfg.data.train_split
    count = max(ctx.world_size, cfg.train.val_samples // ctx.world_size * ctx.world_size)
    signal, meta = fixed_samples(m, plan.root, split, count, plan.model.num_timepoints)
    usable = signal.shape[0] // ctx.world_size * ctx.world_size  # equal work per rank (ZeRO-3 needs it)
    idx = list(range(ctx.rank, usable, ctx.world_size))
    c = plan.model
    # Window i of the split gets the mask `brainlm reconstruct` gives it: a learning curve measures the final table.
    masks = seeded_masks(protocol_seeds(idx, c.masking), plan.num_parcels, c.num_patches, c.mask_ratio, c.masking)
    context = None
    if c.prior_context:  # as `brainlm reconstruct --context all`: the other windows of the window's recording
        recordings, starts = [x["recording"] for x in meta], [int(x["start"]) for x in meta]
        cov_BRR, n_B = context_statistics(signal.numpy(), context_windows(recordings, starts, c.num_timepoints, None))
        context = (torch.from_numpy(cov_BRR[idx]).float(), torch.from_numpy(n_B[idx]))
    return ValidationSet(signal[idx], masks, context)


def build_tracker(
    cfg: PretrainConfig, plan: Plan, ctx: ds.DistContext, ds_resolved: dict, run_id: str | None
) -> Tracker | None:
    """The MLflow run (rank 0 only; None elsewhere), resumed when the checkpoint names one."""
    if not ctx.is_main:
        return None
    out_dir = Path(cfg.train.out_dir)
    tracker = Tracker(
        cfg.tracking.tracking_uri or default_tracking_uri(out_dir), cfg.tracking.experiment, cfg.tracking.enabled
    )
    recipe = cfg.to_dict()
    recipe["model"]["num_parcels"] = plan.num_parcels  # the atlas's, not the preset default
    tracker.start(
        cfg.tracking.run_name or out_dir.name,
        {"recipe": recipe, "ds": ds_resolved, "world_size": ctx.world_size, "num_parcels": plan.num_parcels},
        {"git_sha": git_sha(), "manifest_sha256": plan.manifest.plan_sha256, "shards": str(plan.root)},
        resume_run_id=run_id,
    )
    return tracker


def forget_after(log: Path, step: int) -> None:
    """Keep the records of ``log`` (JSON lines) up to ``step``; a torn or unreadable line is dropped."""
    if not log.exists():
        return
    kept = []
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the last line of a run killed while writing it
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    atomic.write_text(log, "".join(f"{line}\n" for line in kept))


def all_mean(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


class Trainer:
    """One rank's training: ``step`` (an optimizer step over grad_accum micro-batches), ``log``, ``validate``,
    ``checkpoint``, ``export``; ``fit`` runs them to ``train.max_steps``."""

    def __init__(
        self,
        cfg: PretrainConfig,
        plan: Plan,
        ctx: ds.DistContext,
        model: BrainLM,
        engine,
        dtype,
        prior_state: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.cfg, self.plan, self.ctx, self.model, self.engine, self.dtype = cfg, plan, ctx, model, engine, dtype
        self.out_dir = Path(cfg.train.out_dir)
        self.coords_R3 = torch.tensor(plan.manifest.atlas.coords(), device=ctx.device, dtype=dtype)
        self.ckpt = Checkpointer(self.out_dir, cfg.train.keep_last, ctx.rank)
        self.tracker: Tracker | None = None
        self.global_batch = global_batch(cfg, ctx.world_size)
        samples = plan.manifest.num_samples(cfg.data.train_split)
        self.steps_per_epoch = cfg.data.steps_per_epoch or max(1, math.ceil(samples / self.global_batch))
        self.flops = model.flops_per_sample(plan.model.mask_ratio, plan.num_parcels)
        self.peak = cfg.train.peak_tflops or ds.peak_tflops(ctx.device)
        self._window = {"start": time.time(), "samples": 0, "wait": 0.0}
        self.prior_state = prior_state or {}  # the Gaussian prior's fp32 statistics, if the model has one

    # -- one step ------------------------------------------------------------------------------------------

    def step(self, loader: TrainLoader, step: int) -> float:
        """Forward, backward and optimizer step for ``grad_accum`` micro-batches; the global mean loss."""
        step_loss = 0.0
        accum = self.cfg.train.grad_accum
        for _ in range(accum):
            t0 = time.time()
            batch = next(loader)
            self._window["wait"] += time.time() - t0
            signal = batch["signal"].to(self.ctx.device, dtype=self.dtype, non_blocking=True)
            context = None
            if "context_cov" in batch:
                context = (batch["context_cov"].to(self.ctx.device), batch["context_n"].to(self.ctx.device))
            out = self.engine(signal, self.coords_R3, mask_BL=batch["mask"].to(self.ctx.device), context=context)
            self.engine.backward(out.loss)
            self.engine.step()
            step_loss += float(out.loss.detach()) / accum
        self._window["samples"] += self.global_batch
        loss = all_mean(step_loss, self.ctx.device)
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"step {step + 1}: the loss is {loss}; stopping. Lower optim.base_lr (now {self.cfg.optim.base_lr}), "
                f"check the shards with `python -m data_prep inspect`, or resume from the last checkpoint in "
                f"{self.ckpt.folder}"
            )
        return loss

    def log(self, done: int, loss: float) -> None:
        """One line and one metrics record for the interval since the last log (rank 0)."""
        w = self._window
        elapsed = max(time.time() - w["start"], 1e-9)
        sps = w["samples"] / elapsed
        grad_norm = self.engine.get_global_grad_norm()
        lr = self.engine.lr_scheduler.get_last_lr()[0]
        tokens = self.plan.model.num_tokens
        metrics = {
            "loss": loss,
            "lr": lr,
            "samples_per_s": sps,
            "tokens_per_s": sps * tokens,
            "data_wait": w["wait"] / elapsed,
            "memory_gib": ds.memory_gib(self.ctx.device),
            "epoch": done / self.steps_per_epoch,
        }
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        mfu = ""
        if self.peak:
            metrics["mfu"] = sps * self.flops / (self.peak * 1e12 * self.ctx.world_size)
            mfu = f" | mfu {metrics['mfu']:6.1%}"
        print(
            f"step {done:>6}/{self.cfg.train.max_steps} | loss {loss:.4f} | lr {lr:.2e} | grad_norm "
            f"{metrics.get('grad_norm', float('nan')):.3f} | {sps:7.1f} samples/s | "
            f"{sps * tokens / 1e3:8.1f}k tokens/s{mfu} | data {metrics['data_wait']:5.1%} | "
            f"mem {metrics['memory_gib']:.2f} GiB",
            flush=True,
        )
        self._record(done, metrics)
        self._window = {"start": time.time(), "samples": 0, "wait": 0.0}

    def _record(self, step: int, metrics: dict[str, float]) -> None:
        self.tracker.log_metrics(metrics, step=step)
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    # -- validation, checkpoints, export -------------------------------------------------------------------

    @torch.no_grad()
    def validate(self, val: ValidationSet) -> float:
        """Pooled masked R^2 over every rank's validation windows."""
        self.engine.eval()
        sums = R2Sums()
        for i in range(0, val.signal.shape[0], 8):
            x = val.signal[i : i + 8].to(self.ctx.device, dtype=self.dtype)
            mask = val.masks[i : i + 8].to(self.ctx.device)
            out = self.engine(x, self.coords_R3, mask_BL=mask, context=val.context_of(slice(i, i + 8), self.ctx.device))
            sums.add(out.pred_BLP.float(), self.model.patchify(x.float()), out.mask_BL)
        total = sums.tensor().to(self.ctx.device)
        dist.all_reduce(total)
        self.engine.train()
        return R2Sums.from_tensor(total.cpu()).r2

    def checkpoint(self, step: int) -> None:
        meta = {
            "model": self.plan.model.to_dict(),
            "recipe": self.cfg.to_dict(),
            "world_size": self.ctx.world_size,
            "mlflow_run_id": self.tracker.run_id if self.tracker else None,
        }
        self.ckpt.save(self.engine, step, meta)

    def resume(self) -> tuple[int, str | None]:
        """(step, MLflow run id) of the checkpoint ``train.resume`` names, restored into the engine; (0, None)."""
        resume = self.cfg.train.resume
        path = self.ckpt.latest() if resume == "auto" else (Path(resume) if resume else None)
        if path is None:
            return 0, None
        meta = self.ckpt.load(self.engine, path, self.plan.model.to_dict())
        if self.ctx.is_main:
            print(f"resumed from {path} at step {meta['step']}", flush=True)
            self._forget_after(meta["step"])
        return meta["step"], meta.get("mlflow_run_id")

    def _forget_after(self, step: int) -> None:
        """metrics.jsonl without the records of steps after ``step`` (the killed run logged them; this one logs
        them again), and without a line the kill tore in half."""
        forget_after(self.out_dir / "metrics.jsonl", step)

    def export(self) -> Path:
        """The consolidated model folder (rank 0 writes it; every rank calls this)."""
        state = ds.full_state_dict(self.engine)
        target = self.out_dir / "model"
        if self.ctx.is_main:
            model = BrainLM(self.plan.model)
            model.load_state_dict({**state, **self.prior_state})
            m = self.plan.manifest
            this = {
                "shards": str(self.plan.root),
                "manifest_sha256": m.plan_sha256,
                "atlas": m.atlas.name,
                "tr": m.tr,
                "train_subjects": len(m.subjects_of(self.cfg.data.train_split)),
                "steps": self.cfg.train.max_steps,
            }
            model.save_pretrained(
                target,
                scaling=m.scaling,
                extra={
                    "atlas": dataclasses.asdict(m.atlas),
                    "tr": m.tr,
                    "shards": str(self.plan.root),
                    "manifest_sha256": m.plan_sha256,
                    "trained_on": [*trained_on(self.model.extra), this],
                    "preset": self.cfg.preset,
                    "steps": self.cfg.train.max_steps,
                    "git_sha": git_sha(),
                },
            )
            print(f"exported {target} (model.safetensors, config.json, scaling.json, extra.json)", flush=True)
        dist.barrier()
        return target

    # -- the loop ------------------------------------------------------------------------------------------

    def fit(self, loader: TrainLoader, val: ValidationSet, start_step: int, result: RunResult) -> None:
        t = self.cfg.train
        self.engine.train()
        for step in range(start_step, t.max_steps):
            loss = self.step(loader, step)
            result.losses.append(loss)
            done = step + 1
            last = done == t.max_steps
            if self.ctx.is_main and (done % t.log_every == 0 or last):
                self.log(done, loss)
            if (t.val_every and done % t.val_every == 0) or last:
                r2 = result.val_r2[done] = self.validate(val)
                if self.ctx.is_main:
                    print(f"step {done:>6}/{t.max_steps} | val masked R^2 {r2:.4f} (pooled, fixed masks)", flush=True)
                    self._record(done, {"val_masked_r2": r2})
            if (t.ckpt_every and done % t.ckpt_every == 0) or last:
                self.checkpoint(done)
            result.steps = done


def run(cfg: PretrainConfig, ds_config: dict | str | Path = "ds_config.json") -> RunResult:
    """Train, checkpoint, validate, export and register; every rank calls this."""
    plan = preflight(cfg, ds_config)
    ctx = ds.init_distributed(cfg.train.dist_timeout_s)
    lock = FolderLock(cfg.train.out_dir, "a pretraining run")
    try:
        if ctx.is_main:  # one run per out_dir: two would resume from and overwrite each other's checkpoints
            lock.acquire()
        result = _run(cfg, plan, ctx)
    except BaseException as err:
        # No collective on the way out: the other ranks may be waiting in one that this rank will never join. Say
        # what happened here and now; the launcher stops the other ranks when this one exits.
        print(f"rank {ctx.rank}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        raise
    finally:
        lock.release()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return result


def _run(cfg: PretrainConfig, plan: Plan, ctx: ds.DistContext) -> RunResult:
    model = build_model(cfg, plan)
    prior_state = fit_prior(model, cfg, plan) if model.decoder_prior_embed is not None else {}
    ds_resolved = resolve_ds_config(plan.ds_config, cfg, ctx.world_size, ds.bf16_supported())
    warmup = warmup_steps(cfg)
    engine = ds.initialize(
        model,
        model.param_groups(cfg.optim.weight_decay),
        ds_resolved,
        lambda step: warmup_cosine(step, warmup, cfg.train.max_steps, cfg.optim.min_lr_ratio),
    )
    dtype = torch.bfloat16 if ds_resolved.get("bf16", {}).get("enabled") else torch.float32
    out_dir = Path(cfg.train.out_dir)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, plan, ctx, model, engine, dtype, prior_state)
    start_step, run_id = trainer.resume()
    if start_step >= cfg.train.max_steps and (out_dir / "model" / "config.json").exists():
        result = RunResult(out_dir=out_dir, steps=start_step, model_dir=out_dir / "model", run_id=run_id)
        if ctx.is_main:
            print(
                f"{out_dir} is already complete ({start_step} steps, model in {out_dir / 'model'}); "
                "raise train.max_steps to train on",
                flush=True,
            )
            if run_id:  # a run killed after its export: finish what it left (registration, the run's status)
                trainer.tracker = build_tracker(cfg, plan, ctx, ds_resolved, run_id)
                finish_tracking(cfg, plan, trainer, result, None)
        return result
    loader = build_loader(cfg, plan, ctx, start_step)
    val = build_validation(cfg, plan, ctx)
    trainer.tracker = build_tracker(cfg, plan, ctx, ds_resolved, run_id)
    if trainer.tracker is not None and start_step:
        # MLflow keeps every value it was sent: the steps after the checkpoint appear twice in its history.
        trainer.tracker.set_tags({"brainlm.resumed_at_steps": str(start_step)})
    if ctx.is_main:
        w, gb = ctx.world_size, trainer.global_batch
        print(
            f"pretrain: {model.num_params() / 1e6:.2f}M params ({cfg.preset}), {plan.num_parcels} parcels x "
            f"{plan.model.num_timepoints} timepoints, {w} rank(s), global batch {gb} ({cfg.train.micro_batch_size} x "
            f"{cfg.train.grad_accum} x {w}), lr {lr_of(cfg, w):.2e}, {trainer.steps_per_epoch} steps/epoch, ZeRO "
            f"{ds.zero_stage(engine)}, {dtype}, device {ctx.device}",
            flush=True,
        )

    result = RunResult(out_dir=out_dir, steps=start_step)
    try:
        trainer.fit(loader, val, start_step, result)
        if cfg.train.export:
            result.model_dir = trainer.export()
    except BaseException:
        if trainer.tracker is not None:
            trainer.tracker.end("FAILED")  # a run that ends by an error says so in MLflow
        raise
    if ctx.is_main:
        finish_tracking(cfg, plan, trainer, result, val)
    return result


REGISTERED_TAG = "brainlm.registered_version"


def finish_tracking(cfg: PretrainConfig, plan: Plan, trainer: Trainer, result: RunResult, val) -> None:
    """Rank 0, after the export: the run's artifacts, the registration (once: a re-run after a kill between export
    and registration registers what is missing, nothing twice) and the run's end."""
    tracker = trainer.tracker
    result.run_id = tracker.run_id
    if result.model_dir is not None and tracker.tag(REGISTERED_TAG) is None:
        if val is not None:
            _log_reconstruction_figure(result.model_dir, val, trainer.coords_R3, result.out_dir, tracker)
        tracker.log_artifact(result.model_dir / "config.json", "export")
        if cfg.tracking.register_as:
            result.registered_version = tracker.register(
                result.model_dir,
                cfg.tracking.register_as,
                cfg.tracking.alias,
                {"manifest_sha256": plan.manifest.plan_sha256, "git_sha": git_sha(), "preset": cfg.preset},
            )
            if result.registered_version is None:
                print(
                    f"warning: the model was not registered as {cfg.tracking.register_as} (MLflow tracking is "
                    f"off or failed, see above); use the folder {result.model_dir} as --model",
                    file=sys.stderr,
                    flush=True,
                )
            else:
                tracker.set_tags({REGISTERED_TAG: str(result.registered_version)})
    tracker.end()


def _log_reconstruction_figure(model_dir: Path, val: ValidationSet, coords_R3, out_dir: Path, tracker: Tracker) -> None:
    """True vs reconstructed signals of one validation crop, for the run's artifacts."""
    try:
        from brainlm.plots import reconstruction_figure

        path = reconstruction_figure(
            BrainLM.from_pretrained(model_dir), val.signal[:1], coords_R3.float().cpu(), out_dir / "reconstruction.png"
        )
        tracker.log_artifact(path, "figures")
    except Exception as err:  # a figure must never fail a finished run
        print(f"warning: reconstruction figure failed ({type(err).__name__}: {err})", file=sys.stderr)
