"""Checkpoints that survive a kill: written under a temporary name, renamed when every rank is done.

    out_dir/checkpoints/step_00000200/   DeepSpeed's shards + brainlm.json + rng_rank{r}.safetensors
    out_dir/checkpoints/latest           "step_00000200", replaced atomically after the rename

A checkpoint folder without the ``.tmp-`` prefix is complete. Temporary folders left by a killed run are
removed at the next start. ``brainlm.json`` holds the model config, the step, the loader position and the
MLflow run, and refuses a resume into a different model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from brainlm import atomic
from brainlm.exceptions import CheckpointError
from brainlm.training import engine as ds

META = "brainlm.json"
# Model fields that may change between a checkpoint and its resume: they do not change the weights.
RUNTIME_FIELDS = {"attention_backend"}


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class Checkpointer:
    def __init__(self, out_dir: str | Path, keep_last: int, rank: int) -> None:
        self.folder = Path(out_dir) / "checkpoints"
        self.keep_last, self.rank = keep_last, rank
        if rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            for stale in self.folder.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        _barrier()

    def complete(self) -> list[Path]:
        return sorted(p for p in self.folder.glob("step_*") if (p / META).exists())

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, engine, step: int, meta: dict[str, Any]) -> Path:
        """Every rank calls this. Returns the checkpoint folder."""
        tag = tag_of(step)
        tmp = f".tmp-{tag}"
        ds.save_checkpoint(engine, str(self.folder), tmp, client_state={"step": step})
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng |= {f"cuda_{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())}
        save_file(rng, self.folder / tmp / f"rng_rank{self.rank}.safetensors")
        _barrier()
        final = self.folder / tag
        if self.rank == 0:
            (self.folder / tmp / META).write_text(json.dumps({**meta, "step": step}, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(self.folder / tmp, final)
            atomic.write_text(self.folder / "latest", tag)
            for old in self.complete()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return final

    def load(self, engine, path: str | Path, model_config: dict[str, Any]) -> dict[str, Any]:
        """Restore weights, optimizer, schedule and RNG from ``path``; returns its metadata."""
        path = Path(path)
        if not (path / META).exists():
            raise CheckpointError(
                f"{path} is not a complete brainlm checkpoint (no {META}); expected a folder like "
                f"{self.folder}/step_00000100, or --train.resume auto"
            )
        meta = json.loads((path / META).read_text())
        saved = meta.get("model", {})
        diff = {k: (saved.get(k), v) for k, v in model_config.items() if k not in RUNTIME_FIELDS and saved.get(k) != v}
        if diff:
            details = ", ".join(f"model.{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
            raise CheckpointError(
                f"{path} was written by a different model config ({details}); resume with the same model "
                "settings, or start a fresh run in another train.out_dir"
            )
        world = dist.get_world_size() if dist.is_initialized() else 1
        if meta.get("world_size", world) != world:
            raise CheckpointError(
                f"{path} was written by {meta['world_size']} rank(s) but this run has {world}; ZeRO shards and "
                "the per-rank RNG are laid out per rank: resume with the same number of nodes x GPUs"
            )
        ds.load_checkpoint(engine, str(path.parent), path.name)
        rng_file = path / f"rng_rank{self.rank}.safetensors"
        if rng_file.exists():
            rng = load_file(rng_file)
            cuda = [rng[f"cuda_{i}"] for i in range(len(rng) - 1)]
        else:  # checkpoints of earlier versions: a torch file, read as tensors only
            old = ds.weights_only_load(str(path / f"rng_rank{self.rank}.pt"))
            rng, cuda = {"torch": old["torch"]}, old.get("cuda") or []
        torch.set_rng_state(rng["torch"])
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        return meta


class BestWeights:
    """``train.select best``: the weights of the best validation step so far, in ``out_dir/best`` (model.safetensors,
    then best.json: a kill leaves the previous best whole), and what a resume keeps of them."""

    def __init__(self, out_dir: str | Path) -> None:
        self.folder = Path(out_dir) / "best"
        self.kept: tuple[int, float] | None = None  # (step, validation R^2)

    def restore(self, step: int) -> None:
        """Keep what was kept up to ``step`` (a killed run's later ones are validated again)."""
        record = self.folder / "best.json"
        kept = json.loads(record.read_text()) if record.exists() else None
        self.kept = (int(kept["step"]), float(kept["r2"])) if kept and kept["step"] <= step else None

    def improves(self, r2: float) -> bool:
        return self.kept is None or r2 > self.kept[1]

    def keep(self, state: dict[str, torch.Tensor] | None, step: int, r2: float) -> None:
        """Rank 0 gives the full state (others None and only update their record)."""
        if state is not None:
            atomic.write_all(
                [
                    (self.folder / "model.safetensors", lambda tmp: save_file(state, tmp)),
                    (self.folder / "best.json", lambda tmp: Path(tmp).write_text(json.dumps({"step": step, "r2": r2}))),
                ]
            )
        self.kept = (step, r2)

    def load(self) -> dict[str, torch.Tensor]:
        return load_file(self.folder / "model.safetensors")

    def record(self, max_steps: int) -> dict[str, Any]:
        """What the export's extra.json says of the selection."""
        step, r2 = self.kept
        return {"rule": "best validation step", "step": step, "val_masked_r2": r2, "of_steps": max_steps}
