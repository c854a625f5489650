"""Everything that touches DeepSpeed: process group, engine, checkpoint I/O, consolidated weights.

deepspeed is imported here and nowhere else.
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from brainlm import threads


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: float = 600.0) -> DistContext:
    """Join (or create) the process group: under the deepspeed launcher, torchrun, or plain python."""
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # say so rather than let DeepSpeed warn that it guessed
    import deepspeed

    if "RANK" not in os.environ:  # a plain `python launcher/pretrain.py`: a world of one
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"})
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not cuda:
        # DeepSpeed JIT-compiles a shared-memory comm op on CPU (minutes on a small machine; a cold run was
        # seen to fail). Plain gloo is enough here. `import ... as m` would bind the wrong object.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    # DeepSpeed's ZeRO calls a collective that torch deprecates; one warning per step is noise.
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*all_gather_into_tensor")
    from datetime import timedelta

    # Every collective is bounded by train.dist_timeout_s: the default group's timeout is passed here, and the groups
    # DeepSpeed creates itself (ZeRO's data-parallel groups, new_group without a timeout) take torch's module default
    # of 30 minutes, which is set to the same value first (a frozen rank otherwise held the job 1,800 s).
    c10d = importlib.import_module("torch.distributed.distributed_c10d")
    c10d.default_pg_timeout = timedelta(seconds=timeout_s)
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), timedelta):
        c10d.default_pg_nccl_timeout = timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    if not cuda:
        # Ranks on one machine share its free cores: oversubscribed threads run slower, not faster (brainlm.threads).
        # A thread count given from outside (BRAINLM_THREADS, OMP_NUM_THREADS as Ray sets for a trial) wins.
        local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
        threads.apply(local)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistContext(rank, world, local_rank, device)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def initialize(model: torch.nn.Module, param_groups: list[dict], ds_config: dict, lr_lambda) -> Any:
    """A DeepSpeed engine with the config's optimizer and a LambdaLR schedule (checkpointed by DeepSpeed)."""
    import deepspeed

    def scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)

    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups, config=ds_config, lr_scheduler=scheduler
    )
    return engine


def zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage())


def full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The whole model's fp32 weights on rank 0 (None elsewhere); every rank must call it."""
    import deepspeed

    module = engine.module
    if zero_stage(engine) == 3:
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return _cpu_state(module) if dist.get_rank() == 0 else None
    return _cpu_state(module) if dist.get_rank() == 0 else None


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


def save_checkpoint(engine, folder: str, tag: str, client_state: dict) -> None:
    """DeepSpeed's sharded checkpoint (every rank writes its part); ``latest`` is ours to write."""
    engine.save_checkpoint(folder, tag=tag, client_state=client_state, save_latest=False)


def _deepspeed_globals() -> list:
    """The DeepSpeed classes its ZeRO 1-3 checkpoints pickle beside their tensors (found by loading them with
    weights_only=True): the only objects a resume unpickles."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def weights_only_load(path: str, map_location=None):
    """torch.load with weights_only=True and DeepSpeed's few classes allowed: a crafted checkpoint cannot run code."""
    import pickle

    from brainlm.exceptions import CheckpointError

    with torch.serialization.safe_globals(_deepspeed_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            first = next((ln.strip() for ln in str(err).splitlines() if "GLOBAL" in ln), str(err).splitlines()[0])
            raise CheckpointError(
                f"{path} holds objects a checkpoint should not ({first}); brainlm loads only tensors and DeepSpeed's "
                "own state. Resume only from checkpoints your own runs wrote"
            ) from None


def load_checkpoint(engine, folder: str, tag: str) -> dict:
    engine.checkpoint_engine.load = weights_only_load  # DeepSpeed's own engine unpickles anything
    path, client_state = engine.load_checkpoint(
        folder, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        from brainlm.exceptions import CheckpointError

        raise CheckpointError(f"DeepSpeed found no checkpoint {tag!r} in {folder}")
    return client_state or {}


def memory_gib(device: torch.device) -> float:
    """Peak accelerator memory, or the process's resident memory on CPU, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# bf16 dense peak TFLOP/s per device, for MFU (H100/H200 SXM; A100).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
