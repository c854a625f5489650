"""The Ray side of a sweep: its options, where Ray keeps its results, and the Ray session (a local Ray on loopback,
or a cluster)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ray
import torch

from brainlm.exceptions import ConfigError
from brainlm.logs import to_terminal
from brainlm.tuning.options import SweepOptions

log = logging.getLogger(__name__)


def storage_path(opts: SweepOptions) -> str:
    return opts.storage if "://" in opts.storage else str(Path(opts.storage).resolve())


def storage_filesystem(storage: str):
    """Ray's storage through the filesystem the shard sets use (``brainlm.data.store``: the same endpoint, credentials,
    timeouts and retries, and any fsspec URL), as the pyarrow filesystem Ray takes; None for a local folder."""
    if "://" not in storage or storage.startswith("file://"):
        return None
    from pyarrow import fs

    from brainlm.data.store import filesystem, split_protocol
    from brainlm.exceptions import StoreError

    try:
        return fs.PyFileSystem(fs.FSSpecHandler(filesystem(split_protocol(storage)[0])))
    except StoreError as err:  # no fsspec filesystem for it here: Ray's own (pyarrow's) may still reach it
        log.info(f"note: Ray's storage {storage} goes through pyarrow's filesystem ({err})")
        return None


def s3_compatible_checksums(storage: str) -> None:
    """S3-compatible servers (an endpoint other than AWS's) may refuse the checksums newer AWS SDKs add to every
    upload (SeaweedFS answers UploadPart with INVALID_ACCESS_KEY_ID): ask for them only where required. Set before
    Ray starts, so a local Ray's workers inherit it; on a cluster put it in the pods' environment."""
    if storage.startswith("s3://") and (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")):
        os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
        os.environ.setdefault("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")


@contextmanager
def ray_session(opts: SweepOptions) -> Iterator[None]:
    """Join a cluster (``--address``) or start a local Ray bound to loopback with the CPUs it is given."""
    s3_compatible_checksums(opts.storage)
    started = False
    address = opts.address or os.environ.get("RAY_ADDRESS")  # Ray's own variable, e.g. inside `ray job submit`
    if not ray.is_initialized():
        if address:
            log.info(f"joining the Ray cluster at {address}")
            # Through Ray Client (ray://) Tune's driver loop, and so MLflowTrials' lines, run on the head node.
            ray.init(address=address, log_to_driver=address.startswith("ray://"))
        else:
            # Ray binds to the machine's network address by default; a local sweep needs loopback only. The
            # variable is read by Ray's node-address lookup (and by the processes it starts).
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
            ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
            ray.init(
                num_cpus=opts.num_cpus or os.cpu_count(),
                num_gpus=torch.cuda.device_count(),
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                log_to_driver=False,
            )
        started = True
    try:
        check_resources(opts)
        yield
    finally:
        if started:
            ray.shutdown()


def check_resources(opts: SweepOptions) -> None:
    have = ray.cluster_resources()
    cpus, gpus = have.get("CPU", 0), have.get("GPU", 0)
    if opts.cpus_per_trial <= cpus and opts.gpus_per_trial <= gpus:
        return
    msg = (
        f"a trial asks for {opts.cpus_per_trial:g} CPU(s) and {opts.gpus_per_trial:g} GPU(s) but Ray has "
        f"{cpus:g} CPU(s) and {gpus:g} GPU(s)"
    )
    if opts.address or os.environ.get("RAY_ADDRESS"):  # an autoscaling cluster may still grow
        log.warning(f"{msg}; trials wait until the cluster grows")
    else:
        raise ConfigError(f"{msg}; lower --cpus-per-trial / --gpus-per-trial or raise --num-cpus")


def trial_device(opts: SweepOptions) -> str:
    """Where a trial computes: the GPU Ray reserves for it (--gpus-per-trial > 0), else the CPU."""
    return "cuda" if opts.gpus_per_trial > 0 else "cpu"


def in_trial(threads: int) -> None:
    """A trial's set-up in its own process (a Ray worker): its CPU threads, and the library's messages on the
    worker's output, which Ray forwards to the driver's terminal as the sweep's command would show them."""
    torch.set_num_threads(max(1, threads))
    to_terminal()
