"""Pretraining in parts, as torchtitan lays it out: ``preflight`` (``brainlm.training.plan``: what the run is,
checked before any process group: the shard sets, the model it trains, the DeepSpeed JSON), the builders (model,
loader, validation sets, tracker), and a ``Trainer`` that steps, logs, validates, checkpoints and exports.
``run(cfg, ds_config)`` puts them together; ``launcher/pretrain.py``, the scaling sweep's trials and the tests call it.

Masks come with the batches: the loader draws each sample's mask from the sample's seed (``MaskSpec``), in the
worker that reads it; validation windows carry the evaluation protocol's masks (``brainlm.protocol``).
One file of about 600 lines on purpose: the whole run reads in order, each part a short function or method.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from brainlm import atomic
from brainlm.data.loader import MaskSpec, MixtureLoader, TrainLoader, fixed_samples
from brainlm.exceptions import ConfigError, NonFiniteLossError
from brainlm.lock import FolderLock
from brainlm.masking import seeded_masks
from brainlm.model import BrainLM, prior
from brainlm.model.io import trained_on
from brainlm.protocol import R2Sums, context_statistics, context_windows, protocol_seeds
from brainlm.tracking.env import default_tracking_uri, git_sha
from brainlm.tracking.runs import Tracker
from brainlm.training import engine as ds
from brainlm.training.checkpoint import BestWeights, Checkpointer
from brainlm.training.ds_config import resolve_ds_config
from brainlm.training.plan import Member, Plan, preflight
from brainlm.training.recipe import PretrainConfig, global_batch, lr_of, warmup_steps
from brainlm.training.schedule import warmup_cosine

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    out_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # global mean loss per optimizer step taken in this run
    val_r2: dict[int, float] = field(default_factory=dict)
    model_dir: Path | None = None
    registered_version: int | None = None
    run_id: str | None = None


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
    state = {k: v for k, v in loaded.state_dict().items() if not prior.is_prior_key(k)}
    own = {k: v for k, v in model.state_dict().items() if not prior.is_prior_key(k)}
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
    """Fit the decoder's Gaussian prior on the training split (every rank reads the same windows), one slot per atlas
    of the shard sets (slot 0 the primary set's; sets that share an atlas pool their windows); returns the fp32
    statistics, which the export writes (a bf16 engine casts the module's buffers to bf16)."""
    for slot, group in enumerate(plan.by_atlas()):
        windows = [
            fixed_samples(s.shards, cfg.data.train_split, prior.FIT_WINDOWS, plan.model.num_timepoints)[0]
            for s in group
        ]
        coords = torch.tensor(group[0].manifest.atlas.coords(), dtype=torch.float32)
        model.fit_prior(torch.cat(windows), coords, slot=slot)
    return model.prior_state()


def build_loader(cfg: PretrainConfig, plan: Plan, ctx: ds.DistContext, start_step: int) -> TrainLoader | MixtureLoader:
    """The rank's training micro-batches: one shard set's ``TrainLoader``, or a ``MixtureLoader`` over several."""
    c = plan.model

    def loader(index: int, start: int, seed: int) -> TrainLoader:
        return TrainLoader(
            plan.sets[index].shards,
            cfg.data.train_split,
            cfg.train.micro_batch_size,
            c.num_timepoints,
            seed,
            ctx.rank,
            ctx.world_size,
            cfg.data.num_workers,
            cfg.data.prefetch,
            start=start,
            masks=MaskSpec(c.num_patches, c.mask_ratio, c.masking),
            on_corrupt=cfg.data.on_corrupt,
            context=bool(c.prior_context),
        )

    start = start_step * cfg.train.grad_accum
    if len(plan.sets) == 1:
        return loader(0, start, cfg.train.seed)
    seeds = np.random.SeedSequence(cfg.train.seed).spawn(len(plan.sets))  # each set's streams their own seed
    return MixtureLoader(
        lambda i, served: loader(i, served, int(seeds[i].generate_state(1)[0])),
        [s.weight for s in plan.sets],
        cfg.train.seed,
        start,
    )


@dataclass
class ValidationSet:
    """This rank's share of one shard set's fixed validation windows and their masks (the evaluation protocol's),
    the set's parcel coordinates, and each window's recording context (the protocol's: the rest of its recording)
    for a prior that reads it."""

    signal: torch.Tensor
    masks: torch.Tensor
    coords_R3: torch.Tensor
    name: str = ""
    context: tuple[torch.Tensor, torch.Tensor] | None = None
    held_out: bool = True  # False: the set has no validation subjects and these are training windows
    tr: float | None = None

    def context_of(self, rows: slice, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self.context is None else (self.context[0][rows].to(device), self.context[1][rows].to(device))


def build_validation(cfg: PretrainConfig, plan: Plan, ctx: ds.DistContext) -> list[ValidationSet]:
    """One validation set per shard set (its own curve; the run's figure is their mean)."""
    return [validation_of(cfg, plan, s, ctx) for s in plan.sets]


def validation_of(cfg: PretrainConfig, plan: Plan, member: Member, ctx: ds.DistContext) -> ValidationSet:
    m = member.manifest
    split = cfg.data.val_split if m.num_samples(cfg.data.val_split) else cfg.data.train_split
    count = max(ctx.world_size, cfg.train.val_samples // ctx.world_size * ctx.world_size)
    signal, meta = fixed_samples(member.shards, split, count, plan.model.num_timepoints)
    usable = signal.shape[0] // ctx.world_size * ctx.world_size  # equal work per rank (ZeRO-3 needs it)
    idx = list(range(ctx.rank, usable, ctx.world_size))
    c, R = plan.model, m.atlas.num_parcels
    # Window i of the split gets the mask `brainlm reconstruct` gives it: a learning curve measures the final table.
    masks = seeded_masks(protocol_seeds(idx, c.masking), R, c.num_patches, c.mask_ratio, c.masking)
    context = None
    if c.prior_context:  # as `brainlm reconstruct --context all`: the other windows of the window's recording
        recordings, starts = [x["recording"] for x in meta], [int(x["start"]) for x in meta]
        cov_BRR, n_B = context_statistics(signal.numpy(), context_windows(recordings, starts, c.num_timepoints, None))
        context = (torch.from_numpy(cov_BRR[idx]).float(), torch.from_numpy(n_B[idx]))
    coords = torch.tensor(m.atlas.coords(), dtype=torch.float32)
    return ValidationSet(signal[idx], masks, coords, member.name, context, split == cfg.data.val_split, m.tr)


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
        {
            "git_sha": git_sha(),
            "manifest_sha256": ",".join(s.manifest.plan_sha256 for s in plan.sets),
            "shards": ",".join(str(s.root) for s in plan.sets),
        },
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
        self.coords = [torch.tensor(s.manifest.atlas.coords(), device=ctx.device, dtype=dtype) for s in plan.sets]
        self.trs = [s.manifest.tr for s in plan.sets]  # read by a TR-aware model only
        self.ckpt = Checkpointer(self.out_dir, cfg.train.keep_last, ctx.rank)
        self.tracker: Tracker | None = None
        self.global_batch = global_batch(cfg, ctx.world_size)
        samples = sum(s.manifest.num_samples(cfg.data.train_split) for s in plan.sets)
        self.steps_per_epoch = cfg.data.steps_per_epoch or max(1, math.ceil(samples / self.global_batch))
        weights = np.array([s.weight for s in plan.sets]) / sum(s.weight for s in plan.sets)
        self.flops = sum(
            w * model.flops_per_sample(plan.model.mask_ratio, s.manifest.atlas.num_parcels)
            for w, s in zip(weights, plan.sets, strict=True)
        )
        self.peak = cfg.train.peak_tflops or ds.peak_tflops(ctx.device)
        self._window = {"start": time.time(), "samples": 0, "wait": 0.0}
        self.set_samples = [0] * len(plan.sets)  # samples each shard set gave since this process started
        self.prior_state = prior_state or {}  # the Gaussian prior's fp32 statistics, if the model has one
        self.best = BestWeights(self.out_dir)  # train.select best: the best validated weights so far

    # -- one step ------------------------------------------------------------------------------------------

    def step(self, loader, step: int) -> float:
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
            which = int(batch.get("set", 0))
            self.set_samples[which] += signal.shape[0] * self.ctx.world_size
            mask = batch["mask"].to(self.ctx.device)
            out = self.engine(signal, self.coords[which], mask_BL=mask, context=context, tr=self.trs[which])
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
        if len(self.plan.sets) > 1:  # the mixture as sampled (since this process started)
            metrics |= {f"samples_{s.name}": float(n) for s, n in zip(self.plan.sets, self.set_samples, strict=True)}
        mfu = ""
        if self.peak:
            metrics["mfu"] = sps * self.flops / (self.peak * 1e12 * self.ctx.world_size)
            mfu = f" | mfu {metrics['mfu']:6.1%}"
        log.info(
            f"step {done:>6}/{self.cfg.train.max_steps} | loss {loss:.4f} | lr {lr:.2e} | grad_norm "
            f"{metrics.get('grad_norm', float('nan')):.3f} | {sps:7.1f} samples/s | "
            f"{sps * tokens / 1e3:8.1f}k tokens/s{mfu} | data {metrics['data_wait']:5.1%} | "
            f"mem {metrics['memory_gib']:.2f} GiB"
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
        """Pooled masked R^2 over every rank's validation windows of one shard set."""
        self.engine.eval()
        sums = R2Sums()
        coords = val.coords_R3.to(self.ctx.device, dtype=self.dtype)
        for i in range(0, val.signal.shape[0], 8):
            x = val.signal[i : i + 8].to(self.ctx.device, dtype=self.dtype)
            mask = val.masks[i : i + 8].to(self.ctx.device)
            out = self.engine(
                x, coords, mask_BL=mask, context=val.context_of(slice(i, i + 8), self.ctx.device), tr=val.tr
            )
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
            log.info(f"resumed from {path} at step {meta['step']}")
            self._forget_after(meta["step"])
        self.best.restore(meta["step"])
        return meta["step"], meta.get("mlflow_run_id")

    def _forget_after(self, step: int) -> None:
        """metrics.jsonl without the records of steps after ``step`` (the killed run logged them; this one logs
        them again), and without a line the kill tore in half."""
        forget_after(self.out_dir / "metrics.jsonl", step)

    def export(self) -> Path:
        """The consolidated model folder (rank 0 writes it; every rank calls this)."""
        best = self.cfg.train.select == "best" and self.best.kept is not None
        state = ds.full_state_dict(self.engine) if not best else None  # every rank joins the gather, or none does
        target = self.out_dir / "model"
        if self.ctx.is_main:
            if best:
                state = self.best.load()
            model = BrainLM(self.plan.model)
            model.load_state_dict({**state, **self.prior_state})
            m = self.plan.manifest
            total = sum(s.weight for s in self.plan.sets)
            these = [
                {
                    "shards": str(s.root),
                    "manifest_sha256": s.manifest.plan_sha256,
                    "atlas": s.manifest.atlas.name,
                    "parcels": s.manifest.atlas.num_parcels,
                    "tr": s.manifest.tr,
                    "train_subjects": len(s.manifest.subjects_of(self.cfg.data.train_split)),
                    "train_crops": s.manifest.num_samples(self.cfg.data.train_split),
                    "steps": self.cfg.train.max_steps,
                }
                | ({"weight": s.weight / total, "mixture": str(self.out_dir)} if len(self.plan.sets) > 1 else {})
                for s in self.plan.sets
            ]
            atlases = self.atlases()
            model.save_pretrained(
                target,
                scaling=m.scaling,
                extra={
                    "atlas": dataclasses.asdict(m.atlas),
                    "tr": m.tr,
                    "shards": str(self.plan.root),
                    "manifest_sha256": m.plan_sha256,
                    "trained_on": [*trained_on(self.model.extra), *these],
                    "preset": self.cfg.preset,
                    "steps": self.cfg.train.max_steps,
                    "git_sha": git_sha(),
                }
                | ({"atlases": atlases} if len(atlases) > 1 else {})  # a mixture's atlases, each with its scaling
                | ({"selected": self.best.record(self.cfg.train.max_steps)} if best else {}),
            )
            log.info(f"exported {target} (model.safetensors, config.json, scaling.json, extra.json)")
        dist.barrier()
        return target

    def keep_if_best(self, step: int, r2: float) -> None:
        """With ``train.select best``: keep these weights when their validation R^2 is the run's highest so far
        (every rank calls this: the gather is a collective)."""
        if self.cfg.train.select == "best" and self.best.improves(r2):
            self.best.keep(ds.full_state_dict(self.engine), step, r2)

    def atlases(self) -> list[dict]:
        """Each atlas the run trained on, the primary first, with its scaling statistics (those of its first set):
        what `embed` / `reconstruct` of a recording on that atlas applies."""
        return [
            {"atlas": dataclasses.asdict(m.atlas), "scaling": m.scaling, "tr": m.tr}
            for m in (group[0].manifest for group in self.plan.by_atlas())
        ]

    # -- the loop ------------------------------------------------------------------------------------------

    def fit(self, loader, val: list[ValidationSet], start_step: int, result: RunResult) -> None:
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
                per_set = [self.validate(v) for v in val]
                # The run's figure: the mean over the sets with validation subjects (a set without them is scored on
                # training windows: what was fitted); every set's when none has them.
                scored = [v.held_out for v in val] if any(v.held_out for v in val) else [True] * len(val)
                r2 = result.val_r2[done] = float(np.mean([x for x, k in zip(per_set, scored, strict=True) if k]))
                if self.ctx.is_main:
                    named = [(f"{v.name} {x:.4f}", k) for v, x, k in zip(val, per_set, scored, strict=True)]
                    sets = "" if len(val) == 1 else " = mean of " + ", ".join(n for n, k in named if k)
                    if not all(scored):
                        sets += "; training windows, not in it: " + ", ".join(n for n, k in named if not k)
                    line = f"step {done:>6}/{t.max_steps} | val masked R^2 {r2:.4f} (pooled, fixed masks){sets}"
                    log.info(line)
                    record = {"val_masked_r2": r2}
                    if len(val) > 1:
                        record |= {f"val_masked_r2_{v.name}": x for v, x in zip(val, per_set, strict=True)}
                    self._record(done, record)
                self.keep_if_best(done, r2)
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
        log.error(f"rank {ctx.rank}: {type(err).__name__}: {err}")
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
            log.info(
                f"{out_dir} is already complete ({start_step} steps, model in {out_dir / 'model'}); "
                "raise train.max_steps to train on"
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
    if ctx.is_main and len(plan.sets) > 1:
        total = sum(s.weight for s in plan.sets)
        log.info(
            "mixture: "
            + ", ".join(
                f"{s.name} ({s.manifest.atlas.name}, {s.manifest.atlas.num_parcels} parcels, "
                f"{s.manifest.num_samples(cfg.data.train_split)} crops, weight {s.weight / total:.2f})"
                for s in plan.sets
            )
            + "; one shard set per micro-batch"
        )
        if model.decoder_prior_embed is not None and model.num_prior_slots > 1:
            n = model.num_prior_slots
            log.info(f"decoder prior: one per atlas ({n}), each fitted on its sets' train split")
    if ctx.is_main:
        w, gb = ctx.world_size, trainer.global_batch
        log.info(
            f"pretrain: {model.num_params() / 1e6:.2f}M params ({cfg.preset}), {plan.num_parcels} parcels x "
            f"{plan.model.num_timepoints} timepoints, {w} rank(s), global batch {gb} ({cfg.train.micro_batch_size} x "
            f"{cfg.train.grad_accum} x {w}), lr {lr_of(cfg, w):.2e}, {trainer.steps_per_epoch} steps/epoch, ZeRO "
            f"{ds.zero_stage(engine)}, {dtype}, device {ctx.device}"
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
            _log_reconstruction_figure(result.model_dir, val[0], result.out_dir, tracker)
        tracker.log_artifact(result.model_dir / "config.json", "export")
        if cfg.tracking.register_as:
            result.registered_version = tracker.register(
                result.model_dir,
                cfg.tracking.register_as,
                cfg.tracking.alias,
                {"manifest_sha256": plan.manifest.plan_sha256, "git_sha": git_sha(), "preset": cfg.preset},
            )
            if result.registered_version is None:
                log.warning(
                    f"the model was not registered as {cfg.tracking.register_as} (MLflow tracking is "
                    f"off or failed, see above); use the folder {result.model_dir} as --model"
                )
            else:
                tracker.set_tags({REGISTERED_TAG: str(result.registered_version)})
    tracker.end()


def _log_reconstruction_figure(model_dir: Path, val: ValidationSet, out_dir: Path, tracker: Tracker) -> None:
    """True vs reconstructed signals of one validation crop, for the run's artifacts."""
    try:
        from brainlm.plots import reconstruction_figure

        path = reconstruction_figure(
            BrainLM.from_pretrained(model_dir), val.signal[:1], val.coords_R3, out_dir / "reconstruction.png", tr=val.tr
        )
        tracker.log_artifact(path, "figures")
    except Exception as err:  # a figure must never fail a finished run
        log.warning(f"reconstruction figure failed ({type(err).__name__}: {err})")
