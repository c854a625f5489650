"""The training loader: deterministic, seekable streams of crops from WebDataset shards (local or S3).

The global micro-batch has ``S = micro_batch_size x world_size`` slots. Slot ``j`` is an endless stream
that reads whole shards one after another: pass ``p`` visits every shard in a seeded permutation, rolled
so the streams start at evenly spaced shards (they read different shards at any moment: a split by rank
and worker) and each covers all shards (resampling: with fewer shards than streams, e.g. 3 shards for
2 ranks x 2 workers, nobody runs dry). Slots that share a shard read it from evenly spaced starting
records (wrapping around), so a batch never holds the same crop twice. At micro-step ``m`` slot ``j``
yields its ``m``-th sample.

Consequences:
- the global batch does not depend on the world size or the number of workers: 1 rank x 8 and 2 ranks x 4
  see the same samples;
- the loader position is the number of micro-steps taken: resuming seeks each stream to sample ``m``
  (arithmetic over the manifest's shard sizes, then skipping within one shard), without replaying;
- every sample carries a seed derived from (run seed, slot, position): the sub-window offset and the mask
  come from it, so they too are independent of the world size and of resumption.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from brainlm.data.format import decode_signal, sample_digest
from brainlm.data.shardset import ShardInfo, ShardSet
from brainlm.data.store import open_url, unanswered
from brainlm.exceptions import BrainLMError, ShardError
from brainlm.masking import seeded_masks

log = logging.getLogger(__name__)


def sample_seed(seed: int, slot: int, position: int) -> int:
    """A 63-bit seed for one sample of the stream, stable across processes and machines."""
    state = np.random.SeedSequence([seed, slot, position]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


ON_CORRUPT = ("error", "skip")
_skipped: dict[str, int] = {}  # url -> corrupt samples skipped in this process (on_corrupt="skip")


def read_shard(
    url: str,
    digests: list[str] | None = None,
    samples: int | None = None,
    on_corrupt: str = "error",
    size: int | None = None,
) -> Iterator[dict]:
    """The raw samples of one shard, in order, through a WebDataset pipeline (no node/worker splitting: the streams
    above decide who reads what). Each sample is checked against the manifest's checksum (``digests``) as it is
    read, and a shard read to its end must hold the ``samples`` the manifest lists: a corrupt shard is an error
    naming it, or with ``on_corrupt="skip"`` its bad samples are skipped, counted and reported. A member whose tar
    header claims more than ``size`` bytes (the whole shard's size in the manifest) is refused before it is read."""
    import tarfile

    import webdataset as wds
    from webdataset.tariterators import group_by_keys

    if on_corrupt not in ON_CORRUPT:
        raise ShardError(f"data.on_corrupt must be one of {', '.join(ON_CORRUPT)}; got {on_corrupt!r}")

    def corrupt(why: str) -> None:
        message = (
            f"{url} is corrupt: {why}. Rebuild it (python -m data_prep build with the same arguments resumes and "
            "rewrites shards whose checksum fails; python -m data_prep inspect lists them), or set "
            "data.on_corrupt=skip to train on without its bad samples"
        )
        if on_corrupt == "error":
            raise ShardError(message)
        _skipped[url] = _skipped.get(url, 0) + 1
        count = _skipped[url]
        if count & (count - 1) == 0:  # the 1st, 2nd, 4th, 8th ... time: a log that says it, not one that floods
            log.warning(f"{message} (skipped {count} sample(s) of it so far; said again at {2 * count})")

    def opened(sources: Iterator[dict]) -> Iterator[dict]:  # through the store, not WebDataset's URL table
        for source in sources:
            yield {**source, "stream": open_url(source["url"])}

    pipeline = wds.DataPipeline(wds.SimpleShardList([url]), opened, partial(tar_members, limit=size), group_by_keys)
    k = 0
    try:
        for raw in pipeline:
            ok = digests is None or (
                k < len(digests)
                and "signal.npy" in raw
                and "json" in raw
                and sample_digest(raw["signal.npy"], raw["json"]) == digests[k]
            )
            if not ok:
                corrupt(f"sample {k} ({raw.get('__key__')}) does not match its checksum in the manifest")
            else:
                yield raw
            k += 1
    except (tarfile.TarError, OSError, ValueError, KeyError) as err:
        store = unanswered(url, err)
        if store is not None:  # the store did not answer: not the shard's fault, and no rebuild is advised
            raise store from err
        corrupt(f"unreadable after {k} sample(s) ({type(err).__name__}: {err})")
        return
    if samples is not None and k != samples:
        corrupt(f"{k} sample(s) read but the manifest lists {samples}")


def tar_members(sources: Iterator[dict], limit: int | None = None) -> Iterator[dict]:
    """WebDataset's tar expander, with each member's size checked against ``limit`` before its bytes are read: a
    crafted header cannot make the reader hold more than the shard the manifest describes."""
    import tarfile

    for source in sources:
        with source["stream"], tarfile.open(fileobj=source["stream"], mode="r|*") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                if limit is not None and info.size > limit:
                    raise ValueError(f"member {info.name} claims {info.size} bytes, more than the shard's {limit}")
                yield {"fname": info.name, "data": tar.extractfile(info).read(), "__url__": source["url"]}
                tar.members = []  # a stream: keep no list of the members read


def rotated(url: str, count: int, first: int, skip: int, **check: Any) -> Iterator[dict]:
    """A shard's records ``first, first + 1, ..., count - 1, 0, ..., first - 1``, from the ``skip``-th on
    (``skip < count``); ``check`` goes to ``read_shard``."""
    begin = (first + skip) % count
    segments = [(begin, count), (0, first)] if begin >= first else [(begin, first)]
    for lo, hi in segments:
        for k, raw in enumerate(read_shard(url, **check)):
            if k >= hi:
                break
            if k >= lo:
                yield raw


def window_start(crop: int, window: int, rng: np.random.Generator | None) -> int:
    """Where a ``window``-long sub-window of a crop starts: random when ``rng`` is given (training), else 0."""
    if crop < window:
        raise ShardError(f"shard crops have {crop} timepoints, fewer than the model's window of {window}")
    return int(rng.integers(0, crop - window + 1)) if rng is not None and crop > window else 0


def window_of(signal_RT: np.ndarray, window: int, rng: np.random.Generator | None) -> np.ndarray:
    """A ``window``-long sub-window: random when ``rng`` is given (training), the first one otherwise."""
    start = window_start(signal_RT.shape[1], window, rng)
    return signal_RT[:, start : start + window]


def crop_context(signal_RT: np.ndarray, start: int, window: int) -> tuple[np.ndarray, int]:
    """The recording context a training window has in its crop: the covariance of the crop's timepoints outside
    the window, and their count (the protocol's context at evaluation: the rest of the recording)."""
    rest_RX = np.concatenate([signal_RT[:, :start], signal_RT[:, start + window :]], axis=1).astype(np.float64)
    if rest_RX.shape[1] < 2:
        return np.zeros((len(signal_RT), len(signal_RT))), 0
    return np.cov(rest_RX), rest_RX.shape[1]


@dataclass(frozen=True)
class MaskSpec:
    """How the loader masks each sample (from the sample's seed, in the worker that reads it)."""

    num_patches: int
    mask_ratio: float
    masking: str = "random"

    def masks(self, seeds_B: torch.Tensor, num_parcels: int) -> torch.Tensor:
        return seeded_masks(seeds_B, num_parcels, self.num_patches, self.mask_ratio, self.masking)


class SlotStreams(IterableDataset):
    """One rank's slots of the global micro-batch; each worker serves a subset of the slots."""

    def __init__(
        self,
        shards: list[ShardInfo],
        slots: list[int],
        num_slots: int,
        window: int,
        seed: int,
        start: int = 0,
        masks: MaskSpec | None = None,
        on_corrupt: str = "error",
        context: bool = False,
    ) -> None:
        if not shards:
            raise ShardError("no shards to stream from")
        self.shards, self.slots, self.num_slots = shards, slots, num_slots
        self.window, self.seed, self.start, self.mask_spec = window, seed, start, masks
        self.on_corrupt, self.context = on_corrupt, context

    def stream(self, slot: int, start: int) -> Iterator[tuple[np.ndarray, int, tuple | None]]:
        """Slot ``slot``'s samples from position ``start`` on: (window [R, W] float32, sample seed, its crop
        context (covariance, timepoints) when asked for)."""
        n, S = len(self.shards), self.num_slots
        rotation = slot * n // S
        sharing = [j for j in range(S) if j * n // S == rotation]  # slots that read the same shard together
        phase = sharing.index(slot) / len(sharing)
        position, pass_index = 0, 0
        while True:
            order = np.roll(np.random.default_rng([self.seed, pass_index]).permutation(n), -rotation)
            yielded, sought = 0, False
            for s in order:
                size = self.shards[s].samples
                if position + size <= start:  # seek: whole shards before the start are never read
                    position += size
                    sought = True
                    continue
                skip = max(0, start - position)
                info = self.shards[s]
                check = {"digests": info.digests, "samples": size, "on_corrupt": self.on_corrupt, "size": info.size}
                for k, raw in enumerate(rotated(info.url, size, int(phase * size), skip, **check), start=skip):
                    seed = sample_seed(self.seed, slot, position + k)
                    crop = decode_signal(raw["signal.npy"])
                    begin = window_start(crop.shape[1], self.window, np.random.default_rng(seed))
                    context = crop_context(crop, begin, self.window) if self.context else None
                    yielded += 1
                    yield crop[:, begin : begin + self.window].astype(np.float32), seed, context
                position += size
            if not yielded and not sought:  # every shard read, every sample skipped as corrupt (on_corrupt=skip)
                raise ShardError(
                    f"data.on_corrupt=skip: a whole pass over the {n} training shard(s) gave no readable sample (the "
                    "warnings above name them); rebuild them (python -m data_prep build with the same arguments "
                    "rewrites shards whose checksum fails) or point data.shards at a good copy"
                )
            pass_index += 1

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = self.slots[worker::workers]
        streams = [self.stream(slot, self.start) for slot in mine]
        while True:
            items = [next(s) for s in streams]
            signal = torch.from_numpy(np.stack([x for x, _, _ in items]))
            seeds = torch.tensor([s for _, s, _ in items], dtype=torch.int64)
            batch = {"signal": signal, "seed": seeds}
            if self.context:
                batch["context_cov"] = torch.from_numpy(np.stack([c[0] for _, _, c in items]).astype(np.float32))
                batch["context_n"] = torch.tensor([c[1] for _, _, c in items], dtype=torch.int64)
            if self.mask_spec is not None:
                batch["mask"] = self.mask_spec.masks(seeds, signal.shape[1])
            yield batch


class TrainLoader:
    """Micro-batches for one rank, in slot order, whatever the number of workers. ``position`` counts the
    micro-batches handed out (the loader state a checkpoint stores)."""

    def __init__(
        self,
        shard_set: ShardSet,
        split: str,
        micro_batch_size: int,
        window: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        prefetch: int = 4,
        start: int = 0,
        masks: MaskSpec | None = None,
        on_corrupt: str = "error",
        context: bool = False,
    ) -> None:
        shards = shard_set.shards(split)
        slots = list(range(rank * micro_batch_size, (rank + 1) * micro_batch_size))
        self.workers = min(num_workers, micro_batch_size)
        dataset = SlotStreams(
            shards, slots, micro_batch_size * world_size, window, seed, start, masks, on_corrupt, context
        )
        self.position = start
        kwargs = {"prefetch_factor": prefetch, "persistent_workers": False} if self.workers else {}
        self.loader = DataLoader(dataset, batch_size=None, num_workers=self.workers, **kwargs)
        # Worker w serves slots w, w + W, ...: restore slot order after concatenating one item per worker.
        served = [slots[w :: max(self.workers, 1)] for w in range(max(self.workers, 1))]
        self.order = torch.argsort(torch.tensor([s for group in served for s in group]))
        self.iterator = iter(self.loader)

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> dict:
        try:
            parts = [next(self.iterator) for _ in range(max(self.workers, 1))]
        except BrainLMError as err:
            # PyTorch re-raises a worker's error as "Caught ShardError in DataLoader worker process 0. Original
            # Traceback ...": say the error itself, as the same job without workers would.
            raise type(err)(worker_message(err)) from None
        except (EOFError, ConnectionError) as err:
            # A worker killed while handing over a batch breaks the pipe before PyTorch's own check of its workers
            # ("DataLoader worker ... exited unexpectedly") runs: say the same thing.
            if not self.workers:
                raise
            raise RuntimeError(
                f"a DataLoader worker of this rank died while handing over a batch ({type(err).__name__}: {err}); "
                "check the machine's memory (a worker killed by the OOM killer) and the system log"
            ) from err
        self.position += 1
        if len(parts) == 1:  # one reader: already in slot order, no copy needed
            return parts[0]
        return {k: torch.cat([p[k] for p in parts])[self.order] for k in parts[0]}


def worker_message(err: BaseException) -> str:
    """The message of an error a DataLoader worker raised, without PyTorch's wrapper and the worker's traceback."""
    text = str(err)
    if "Original Traceback" not in text:
        return text
    lines = text.splitlines()
    name = type(err).__name__
    for i in range(len(lines) - 1, -1, -1):
        head, sep, rest = lines[i].partition(": ")
        if sep and head.rsplit(".", 1)[-1] == name and not lines[i].startswith(" "):
            return "\n".join([rest, *lines[i + 1 :]]).strip()
    return text


def fixed_samples(shard_set: ShardSet, split: str, count: int, window: int) -> tuple[torch.Tensor, list[dict]]:
    """The first ``count`` crops of a split in manifest order, first window of each: a fixed evaluation set."""
    signals, metas = [], []
    for info in shard_set.shards(split):
        for raw in read_shard(info.url, info.digests, info.samples, size=info.size):
            signals.append(window_of(decode_signal(raw["signal.npy"]), window, None).astype(np.float32))
            metas.append(json.loads(raw["json"]))
            if len(signals) == count:
                return torch.from_numpy(np.stack(signals)), metas
    if not signals:
        raise ShardError(f"the {split!r} split has no samples")
    return torch.from_numpy(np.stack(signals)), metas


SCHEDULE_BLOCK = 4096  # micro-steps drawn per seeded block of the mixture's schedule


def mixture_schedule(weights: list[float], seed: int, start: int, count: int) -> np.ndarray:
    """Which shard set each micro-step ``start .. start + count - 1`` of a mixture reads: drawn by ``weights`` from
    one seeded block of SCHEDULE_BLOCK micro-steps at a time, so every rank draws the same and a resumed run the
    same as an uninterrupted one."""
    p = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    first, last = start // SCHEDULE_BLOCK, (start + max(count, 1) - 1) // SCHEDULE_BLOCK
    blocks = [
        np.random.default_rng([seed, 0x5E7, b]).choice(len(p), size=SCHEDULE_BLOCK, p=p) for b in range(first, last + 1)
    ]
    offset = start - first * SCHEDULE_BLOCK
    return np.concatenate(blocks)[offset : offset + count]


class MixtureLoader:
    """Micro-batches from several shard sets (``data.shards`` a list), one set per micro-batch, chosen by
    ``mixture_schedule``: each batch's parcels belong to one atlas, and the batch says which (``batch["set"]``).
    Each set streams through a ``TrainLoader`` of its own (its own seed, resumed at the micro-batches it served
    before ``start``); ``position`` counts the micro-batches handed out, as a ``TrainLoader``'s does."""

    def __init__(self, make_loader, weights: list[float], seed: int, start: int = 0) -> None:
        self.weights, self.seed, self.position = list(weights), seed, start
        served = np.bincount(mixture_schedule(self.weights, seed, 0, start), minlength=len(weights))
        self.loaders = [make_loader(i, int(served[i])) for i in range(len(weights))]
        self._block: tuple[int, np.ndarray] = (-1, np.zeros(0, dtype=np.int64))

    def __iter__(self) -> MixtureLoader:
        return self

    def __next__(self) -> dict:
        b = self.position // SCHEDULE_BLOCK
        if self._block[0] != b:
            self._block = (b, mixture_schedule(self.weights, self.seed, b * SCHEDULE_BLOCK, SCHEDULE_BLOCK))
        which = int(self._block[1][self.position % SCHEDULE_BLOCK])
        batch = next(self.loaders[which])
        self.position += 1
        return {**batch, "set": which}
