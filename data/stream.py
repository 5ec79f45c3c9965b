"""The per-worker batch stream: read -> shuffle -> decode -> transform -> batch, restorable mid-epoch.

Runs inside each DataLoader worker (or in the main process with num_workers=0) and yields whole batches,
each tagged with the logical worker that made it and the number of samples it had to skip.

Restoring a position rests on two facts:
  * In training every batch consumes exactly `raw_per_batch` = ceil(batch_size / repeats) raw samples of its
    worker's shuffled stream (a sample that fails to decode is replaced by a good one of the same batch,
    never by reading more). So after `b` batches of the rank, logical worker w has consumed
    `batches_of(w, num_workers, b) * raw_per_batch` raw samples: the whole position is (epoch, b), identical
    on every rank.
  * The raw stream and every augmentation are pure functions of (seed, epoch, rank, worker, index): the
    shuffle buffer draws from its own seeded RNG, and python/numpy/torch RNGs are re-seeded before each
    sample's transform.
Resuming at batch b therefore replays each worker's raw stream (tar bytes only, nothing decoded) up to its
position, and rotates logical worker ids by b so the DataLoader's round-robin continues where it stopped.
"""
import contextlib
import itertools
import logging
import random
from typing import Callable, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from .decode import decode_sample
from .plan import batches_of, rank_range, segments, shard_order, worker_ranges
from .shards import RawSample, iter_samples

__all__ = ["ShardStream", "sample_seed"]
_logger = logging.getLogger(__name__)
_warnings = itertools.count(1)


def _warn(msg: str) -> None:
    """Log the first 10 warnings of this process, then every 1000th: a bad shard must not flood the log."""
    n = next(_warnings)
    if n <= 10 or n % 1000 == 0:
        _logger.warning("%s (skipped-sample warning %d in this process)", msg, n)


def sample_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from non-negative ints (SeedSequence avoids correlated nearby seeds)."""
    a, b = np.random.SeedSequence([p % 2 ** 63 for p in parts]).generate_state(2)
    return (int(a) << 31) ^ int(b)


@contextlib.contextmanager
def _seeded_rngs(seed: int, restore: bool):
    """Seed python, numpy and torch (CPU) RNGs for one sample's transform.

    In the main process (restore=True) their states are put back afterwards, so that iterating the loader
    does not change the training loop's own random streams; workers skip this (it costs ~70 us a sample).
    """
    saved = (random.getstate(), np.random.get_state()) if restore else None
    with torch.random.fork_rng(devices=[], enabled=restore):
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            if saved is not None:
                random.setstate(saved[0])
                np.random.set_state(saved[1])


def _shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Shuffle buffer: hold `size` items and emit a random one for each new item read."""
    if size <= 1:
        yield from items
        return
    buf = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


class _Peekable:
    """An iterator that can look ahead without consuming."""

    def __init__(self, it: Iterator):
        self._it, self._ahead = it, []

    def __next__(self):
        return self._ahead.pop(0) if self._ahead else next(self._it)

    def ahead(self) -> Iterator:
        yield from list(self._ahead)
        for item in self._it:
            self._ahead.append(item)
            yield item


class _ErrorCount:
    """Counts samples lost to truncated or unreadable shards.

    With a plan (per-shard counts known) the loss is exact: samples planned minus samples read. Without one
    (resampled mode) each unreadable shard counts as one.
    """

    def __init__(self, planned: bool):
        self.count, self.planned, self.repeating = 0, planned, False

    def __call__(self, url: str, exc: Exception) -> None:
        if not self.repeating:
            self.count += 0 if self.planned else 1
            _warn(f"shard {url} is truncated or unreadable, rest of it skipped: {exc!r}")

    def short(self, url: str, missing: int) -> None:
        if not self.repeating:  # a second pass over the same shards loses the same samples: count them once
            self.count += missing
            _warn(f"shard {url} yielded {missing} samples fewer than its listed count")


class ShardStream(IterableDataset):
    """Batches of one rank from a position on; the epoch and first batch are read from `progress` at each iter().

    In training the stream does not stop at the end of the epoch: each worker goes on with its share of the
    next epochs, so the DataLoader prefetches across epoch boundaries instead of restarting its workers'
    pipelines (which cost a batch's worth of decoding per worker at every epoch start). EpochLoader cuts it
    into epochs. Evaluation reads one pass and stops.

    Args:
        urls: expanded shard URLs.
        counts: samples per shard (same order as urls); None in resampled mode.
        fields: subset of {"image", "label", "text", "key"}.
        batch_size: samples per batch.
        transform: PIL image -> float tensor (3, H, W).
        text_transform: str -> anything default_collate can stack (e.g. a token tensor (77,)), or None.
        is_training: shuffle, fixed `steps` batches per rank, corrupt samples replaced (else dropped).
        resampled: draw shards with replacement instead of following the epoch plan.
        seed, rank, world_size: as in build_loader.
        num_workers: DataLoader workers (at least 1 here: the main process counts as one worker).
        steps: batches per rank per epoch in training.
        repeats: repeated augmentation in training: each raw sample is decoded once and transformed `repeats`
            times with different seeds, all copies in the same batch (DeiT's recipe uses 3; where repeats does
            not divide batch_size the batch's last samples have one copy fewer). The epoch keeps its `steps`
            batches, so it reads about 1 / repeats of the samples.
        num_samples: samples per epoch over all ranks (evaluation reads exactly these).
        shuffle_buffer: samples held by each worker's shuffle buffer.
    """

    def __init__(self, urls: List[str], *, counts: Optional[Sequence[int]], fields: Sequence[str],
                 batch_size: int, transform: Callable, text_transform: Optional[Callable], is_training: bool,
                 resampled: bool, seed: int, rank: int, world_size: int, num_workers: int, steps: int,
                 num_samples: int, shuffle_buffer: int, repeats: int = 1):
        super().__init__()
        self.urls, self.counts, self.fields = urls, counts, tuple(fields)
        self.batch_size, self.transform, self.text_transform = batch_size, transform, text_transform
        self.is_training, self.resampled, self.seed = is_training, resampled, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, max(1, num_workers)
        self.steps, self.num_samples, self.shuffle_buffer = steps, num_samples, shuffle_buffer
        self.repeats = repeats if is_training else 1
        self.raw_per_batch = -(-batch_size // self.repeats)
        # [epoch, first batch] of the next iteration; shared memory, so persistent workers see the updates
        self.progress = torch.zeros(2, dtype=torch.long).share_memory_()

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        epoch, begin = (int(v) for v in self.progress)
        worker = info.id if info else 0
        if self.is_training:
            return self._train_epochs(epoch, worker, begin)
        return self._eval_batches((worker + begin) % self.num_workers)

    # ---- raw samples ----------------------------------------------------------------------------------

    def _planned(self, epoch: int, logical: int, errors: _ErrorCount) -> Iterator[RawSample]:
        order = shard_order(len(self.urls), shuffle=self.is_training, seed=self.seed, epoch=epoch)
        per_rank = self.steps * self.raw_per_batch if self.is_training else 0
        lo, hi = rank_range(self.num_samples, self.rank, self.world_size, per_rank=per_rank)
        wlo, whi = worker_ranges(lo, hi, self.raw_per_batch, self.num_workers)[logical]
        for seg in segments(self.counts, order, wlo, whi):
            read = 0
            for sample in iter_samples(self.urls[seg.shard], seg.start, seg.stop, on_error=errors):
                read += 1
                yield sample
            if read < seg.stop - seg.start:
                errors.short(self.urls[seg.shard], seg.stop - seg.start - read)

    def _resampled(self, rng: random.Random, errors: _ErrorCount) -> Iterator[RawSample]:
        empty_draws = 0
        while empty_draws < 10 * len(self.urls):  # every shard empty or unreadable: give up, don't spin
            empty_draws += 1
            for sample in iter_samples(rng.choice(self.urls), on_error=errors):
                empty_draws = 0
                yield sample
        raise RuntimeError(f"no readable sample in {len(self.urls)} shards (resampled mode)")

    def _train_stream(self, epoch: int, logical: int, errors: _ErrorCount) -> Iterator[RawSample]:
        """This worker's shuffled raw stream, repeated if samples were lost to truncated shards."""
        for rep in itertools.count():
            rng = random.Random(sample_seed(self.seed, epoch, self.rank, logical, rep))
            raw = self._resampled(rng, errors) if self.resampled else self._planned(epoch, logical, errors)
            empty = True
            for sample in _shuffled(raw, self.shuffle_buffer, rng):
                empty = False
                yield sample
            if empty:
                raise RuntimeError(f"rank {self.rank} worker {logical}: no readable sample in its shards")
            # NOTE: only reached when shards held fewer samples than their counts said (truncation): the
            # batches this rank owes (lockstep with the other ranks) are filled by reading its part again.
            _warn(f"rank {self.rank} worker {logical}: shards ran short, repeating its samples to fill the epoch")
            errors.repeating = True

    # ---- decoding and batching ------------------------------------------------------------------------

    def _process(self, key: str, members: dict, seeds: Sequence[int]) -> List[Optional[dict]]:
        """Decode one sample, then transform it once per seed (with that seed); None for an unusable copy."""
        try:
            decoded = decode_sample(key, members, self.fields)
        except Exception as exc:  # untrusted data: any failure means "skip this sample", never a crash
            _warn(f"skipping sample {key!r}, decode failed: {exc!r}")
            return [None] * len(seeds)
        copies = []
        for seed in seeds:
            try:  # valid data a transform chokes on (e.g. a 1-pixel image) is skipped too
                with _seeded_rngs(seed, restore=get_worker_info() is None):
                    sample = dict(decoded)
                    if "image" in sample:
                        sample["image"] = self.transform(sample["image"])
                    if "text" in sample and self.text_transform is not None:
                        sample["text"] = self.text_transform(sample["text"])
                copies.append(sample)
            except Exception as exc:
                _warn(f"skipping sample {key!r}, transform failed: {exc!r}")
                copies.append(None)
        return copies

    def _collate(self, samples: List[dict], logical: int, skipped: int) -> dict:
        batch = {f: default_collate([s[f] for s in samples]) for f in self.fields}
        batch["_worker"], batch["_skipped"] = logical, skipped  # stripped by the main-process iterator
        return batch

    def _borrow(self, stream: _Peekable, seed: int, limit: int = 1000) -> dict:
        """The next decodable sample ahead in the stream, without consuming it."""
        for raw in itertools.islice(stream.ahead(), limit):
            sample = self._process(*raw, [seed])[0]
            if sample is not None:
                return sample
        raise RuntimeError(f"rank {self.rank}: {limit} consecutive samples failed to decode or transform "
                           "(see the warnings above): the shards or the transform are unusable")

    def _train_epochs(self, epoch: int, worker: int, begin: int) -> Iterator[dict]:
        """DataLoader worker `worker`'s batches from batch `begin` of `epoch` on, through the following epochs.

        The DataLoader takes batches round-robin, so this worker makes every W-th batch counted from the
        start position. Within an epoch batch j is made by logical worker j % W (what a resume position
        assumes), so at the k-th epoch after the start this worker plays logical worker
        (worker + begin - k * steps) % W.
        """
        for k in itertools.count():
            logical = (worker + begin - k * self.steps) % self.num_workers
            yield from self._train_batches(epoch + k, logical, begin if k == 0 else 0)

    def _seeds(self, epoch: int, logical: int, index: int) -> List[int]:
        """The transform seeds of raw sample `index` of this worker's epoch stream, one per copy."""
        if self.repeats == 1:
            return [sample_seed(self.seed, epoch, self.rank, logical, index)]
        return [sample_seed(self.seed, epoch, self.rank, logical, index, copy) for copy in range(self.repeats)]

    def _train_batches(self, epoch: int, logical: int, begin: int) -> Iterator[dict]:
        errors, bs, raw = _ErrorCount(planned=not self.resampled), self.batch_size, self.raw_per_batch
        stream = _Peekable(self._train_stream(epoch, logical, errors))
        index = batches_of(logical, self.num_workers, begin) * raw
        for _ in range(index):  # fast-forward to the resume position: tar bytes only, nothing decoded
            next(stream)
        errors.count = 0  # those were counted by the run that read them first
        for _ in range(batches_of(logical, self.num_workers, self.steps, begin)):
            seeds = [self._seeds(epoch, logical, index + i) for i in range(raw)]
            copies = [self._process(*next(stream), s) for s in seeds]
            # copy-major order: a sample's copies are raw_per_batch apart, not side by side; the surplus copies
            # of the last samples (where repeats does not divide the batch) are dropped
            samples = [per_sample[c] for c in range(self.repeats) for per_sample in copies][:bs]
            index += raw
            good = [s for s in samples if s is not None]
            if not good:  # the whole batch is unusable: borrow the next decodable sample of the stream
                good = [self._borrow(stream, seeds[0][0])]
            skipped = sum(any(c is None for c in per_sample) for per_sample in copies)
            # a corrupt sample's slot is filled with a good sample of the same batch: the batch keeps its size
            # (all ranks gather equal shapes) and the stream position stays a function of the batch count
            samples = [s if s is not None else good[i % len(good)] for i, s in enumerate(samples)]
            yield self._collate(samples, logical, skipped + errors.count)
            errors.count = 0

    def _eval_batches(self, logical: int) -> Iterator[dict]:
        errors, batch, skipped = _ErrorCount(planned=True), [], 0
        for index, (key, members) in enumerate(self._planned(0, logical, errors)):
            sample = self._process(key, members, [sample_seed(self.seed, self.rank, logical, index)])[0]
            if sample is None:
                skipped += 1
                continue
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield self._collate(batch, logical, skipped + errors.count)
                batch, skipped, errors.count = [], 0, 0
        if batch:
            yield self._collate(batch, logical, skipped + errors.count)
