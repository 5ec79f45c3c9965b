"""build_loader: shards -> a restorable, rank-aware iterable of batches (the one data entry point).

Training (is_training=True) yields exactly `steps_per_epoch = num_samples // (batch_size * world_size)`
batches per epoch on every rank, so DeepSpeed ranks stay in lockstep; the fewer than batch_size *
world_size samples left over are not read that epoch (which ones changes with the shard shuffle). In the
default mode every sample is read at most once per epoch across ranks x workers; with `resampled=True`
shards are drawn with replacement (multi-node, or shards without per-shard counts).

Evaluation reads every sample exactly once across ranks, in order, keeping the last partial batch; ranks may
then differ by one batch.
"""
import dataclasses
import logging
from typing import Callable, Iterator, List, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader
from torchvision.transforms import ToTensor

from .decode import FIELDS
from .info import read_info
from .plan import rank_range
from .shards import count_samples, expand_urls
from .stream import ShardStream

__all__ = ["DataInfo", "EpochLoader", "build_loader"]
_logger = logging.getLogger(__name__)


class EpochLoader:
    """Iterating it once yields one epoch of batches; it remembers how far the epoch got.

    Each batch is a dict {"image": float (B, 3, H, W), "label": long (B,), "text": list[str] or stacked
    text_transform outputs, "key": list[str]}, with only the requested fields.

    Position rules (training): set_epoch(e) starts epoch e at its first batch, except right after
    load_state_dict() for epoch e, where it keeps the restored position; a restored position at the end of
    the epoch yields nothing, so a run checkpointed on an epoch's last batch goes on with the next epoch. An
    iteration left early (break) continues at the next iter(); a finished one iterated again starts over.

    In training one DataLoader iterator is kept while the positions asked for follow each other (the next
    epoch after a finished one, the rest of an epoch left early): the workers' stream runs on across epochs
    and their prefetched batches are used. Any other position restarts the workers' streams there.
    """

    def __init__(self, stream: ShardStream, *, num_workers: int, pin_memory: bool, steps: int):
        self.stream, self.steps = stream, steps
        self.epoch, self.batches_done, self._skipped = 0, 0, 0
        self._restored = False  # the position came from load_state_dict and was not iterated yet
        self._batches, self._next = None, None  # the kept DataLoader iterator and the (epoch, batch) it yields next
        # its own generator: creating an iterator must not draw from the global RNG, whose state a
        # resumed run restores (a draw there would shift every later random mask)
        self._loader = DataLoader(
            stream, batch_size=None, num_workers=num_workers,  # batches are made in the workers
            pin_memory=pin_memory and torch.cuda.is_available(), persistent_workers=num_workers > 0,
            generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict]:
        training = self.stream.is_training
        if not training or (self.batches_done >= self.steps and not self._restored):
            self.batches_done = 0  # a finished epoch iterated again starts over
        self._restored = False
        if not training:
            self.stream.progress.copy_(torch.tensor([self.epoch, 0]))
            for batch in self._loader:
                batch.pop("_worker")
                self._skipped += batch.pop("_skipped")
                yield batch
            return
        if self._batches is None or self._next != (self.epoch, self.batches_done):
            self.stream.progress.copy_(torch.tensor([self.epoch, self.batches_done]))
            self._batches = iter(self._loader)
        while self.batches_done < self.steps:
            batch = next(self._batches)
            worker = batch.pop("_worker")
            self._skipped += batch.pop("_skipped")
            if worker != self.batches_done % self.stream.num_workers:
                raise RuntimeError(f"batch from worker {worker} out of round-robin order at {self.batches_done}")
            self.batches_done += 1  # before yielding: a state_dict() taken now must count this batch
            done = self.batches_done == self.steps
            self._next = (self.epoch + 1, 0) if done else (self.epoch, self.batches_done)
            yield batch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the next iteration; a restored position is kept only for its own epoch."""
        if epoch != self.epoch or not self._restored:
            self.epoch, self.batches_done, self._restored = epoch, 0, False

    def skipped(self) -> int:
        return self._skipped

    def _layout(self) -> dict:
        s = self.stream
        return {"batch_size": s.batch_size, "num_workers": s.num_workers, "world_size": s.world_size,
                "seed": s.seed, "steps_per_epoch": self.steps, "repeated_aug": s.repeats}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done, **self._layout()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])
        self._restored = True
        # a checkpoint written before a layout key existed used that key's default
        saved = {"repeated_aug": 1, **state}
        changed = {k: (saved.get(k), v) for k, v in self._layout().items() if saved.get(k) != v}
        if changed:
            # positions are only meaningful for the same split of the stream; restart the epoch instead
            _logger.warning("data layout changed since the checkpoint %s: epoch %d restarts at its first batch",
                            changed, self.epoch)
            self.batches_done = 0


@dataclasses.dataclass
class DataInfo:
    """What build_loader returns.

    Attributes:
        loader: iterate once per epoch; each item is one batch (a dict).
        num_samples: samples in one epoch over all ranks.
        steps_per_epoch: batches this rank yields per epoch (identical on every rank in training).
        classes: class names from info.json / classes.json, if any.
    """
    loader: EpochLoader
    num_samples: int
    steps_per_epoch: int
    classes: Optional[List[str]]

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def state_dict(self) -> dict:
        """{"epoch", "batches_done", and the layout it is valid for}: identical on every rank."""
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    def skipped(self) -> int:
        """Samples (and unreadable shard tails) skipped so far on this rank, summed over its workers."""
        return self.loader.skipped()


def build_loader(
        urls: Union[str, Sequence[str]],
        *,
        fields: Sequence[str],
        batch_size: int,
        num_workers: int = 2,
        transform: Optional[Callable] = None,
        text_transform: Optional[Callable] = None,
        is_training: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_samples: Optional[int] = None,
        resampled: bool = False,
        shuffle_buffer: int = 1000,
        pin_memory: bool = True,
        repeated_aug: int = 1,
) -> DataInfo:
    """Build the loader of one rank over WebDataset shards.

    Args:
        urls: brace pattern, list of patterns, or sources joined with "::" (local, pipe:, http(s); .tar/.tar.gz).
        fields: which of "image", "label", "text", "key" each batch carries.
        batch_size: samples per batch on this rank.
        num_workers: DataLoader worker processes (0: read in the main process).
        transform: PIL image -> float tensor (3, H, W); default ToTensor (images must then share a size).
        text_transform: str -> tensor (e.g. `lambda s: tokenizer(s)[0]`, (77,)); default keeps strings.
        is_training: shuffle + lockstep batch count (True) or ordered, every sample once (False).
        seed: shard order, shuffle buffer and augmentations all derive from it (with epoch, rank, worker).
        rank, world_size: this process's place among the data-parallel ranks.
        num_samples: samples per epoch over all ranks; overrides info.json, needed when there is none.
        resampled: draw shards with replacement, num_samples // world_size samples per rank and epoch.
        shuffle_buffer: samples each worker holds for shuffling (raw bytes, not decoded images).
        pin_memory: pin batches (only when CUDA is available).
        repeated_aug: training only: each image read is transformed this many times, the copies in the same
            batch (DeiT's repeated augmentation: 3; where it does not divide batch_size the batch's last images
            have one copy fewer); an epoch keeps its batches, so it reads about 1 / repeated_aug of the samples
            (which ones changes with the shard shuffle).
    """
    unknown = set(fields) - FIELDS
    if not fields or unknown:
        raise ValueError(f"fields must be a non-empty subset of {sorted(FIELDS)}, got {fields!r}")
    if not 0 <= rank < world_size or batch_size < 1:
        raise ValueError(f"bad rank={rank}, world_size={world_size} or batch_size={batch_size}")
    if not 1 <= repeated_aug <= batch_size:
        raise ValueError(f"repeated_aug={repeated_aug} must be between 1 and batch_size={batch_size}")
    if resampled and not is_training:
        raise ValueError("resampled=True is for training; evaluation reads every sample once")
    url_list = expand_urls(urls)
    if not url_list:
        raise ValueError(f"no shards in {urls!r}")
    meta = read_info(url_list) or {}
    num_samples = num_samples or meta.get("num_samples")
    if not num_samples:
        key = "data.train_samples" if is_training else "data.eval_samples"
        raise ValueError(f"epoch size unknown for {urls!r}: there is no info.json beside the shards; "
                         f"set {key} (num_samples=) to the number of samples")

    counts = None
    if not resampled:  # the epoch plan needs every shard's size; scanned when info.json has none
        counts = meta.get("shard_counts") or [count_samples(u) for u in url_list]
    if is_training:
        steps = num_samples // (batch_size * world_size)
        needed = steps * -(-batch_size // repeated_aug) * world_size
        if steps == 0:
            raise ValueError(f"{num_samples} samples make no batch of {batch_size} on each of {world_size} ranks")
    else:
        lo, hi = rank_range(num_samples, rank, world_size)
        steps, needed = -(-(hi - lo) // batch_size), num_samples
    if counts is not None and sum(counts) < needed:
        raise ValueError(f"the {len(url_list)} shards hold {sum(counts)} samples, fewer than the "
                         f"{needed} needed for num_samples={num_samples}")
    streams = world_size * max(1, num_workers)
    if not resampled and len(url_list) < streams:
        _logger.info("%d shards for %d ranks x %d workers: shards are split between workers at sample level "
                     "(no sample is read twice; compressed or remote shards are read once per worker)",
                     len(url_list), world_size, max(1, num_workers))

    stream = ShardStream(
        url_list, counts=counts, fields=fields, batch_size=batch_size, transform=transform or ToTensor(),
        text_transform=text_transform, is_training=is_training, resampled=resampled, seed=seed, rank=rank,
        world_size=world_size, num_workers=num_workers, steps=steps, num_samples=num_samples,
        shuffle_buffer=shuffle_buffer if is_training else 0, repeats=repeated_aug)
    loader = EpochLoader(stream, num_workers=num_workers, pin_memory=pin_memory, steps=steps)
    return DataInfo(loader=loader, num_samples=num_samples, steps_per_epoch=steps, classes=meta.get("classes"))
