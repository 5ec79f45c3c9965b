"""Which samples each rank and DataLoader worker reads in one epoch (non-resampled mode).

The shards of an epoch, in order (shuffled with seed + epoch in training), are laid end to end as one
sequence of samples. Each rank takes a contiguous range of it, and each worker of a rank a contiguous
range of that, cut at sample level. So every sample is read at most once per epoch however few shards there
are (a shard may be shared by two workers, each seeking over the other's part), and ranks stay balanced to
the sample.

Batches leave a rank's DataLoader round-robin: batch i comes from worker i % num_workers. A worker's range
holds exactly the samples of its batches, so each worker knows how many batches it owes.
"""
import dataclasses
import random
from typing import List, Sequence, Tuple

__all__ = ["Segment", "batches_of", "shard_order", "rank_range", "worker_ranges", "segments"]


@dataclasses.dataclass(frozen=True)
class Segment:
    """Samples start <= i < stop of shard `shard` (an index into the URL list)."""
    shard: int
    start: int
    stop: int


def batches_of(worker: int, num_workers: int, end: int, begin: int = 0) -> int:
    """How many batch indices i in [begin, end) have i % num_workers == worker."""
    def upto(n):
        return max(0, (n - worker + num_workers - 1) // num_workers)
    return upto(end) - upto(begin)


def shard_order(num_shards: int, *, shuffle: bool, seed: int, epoch: int) -> List[int]:
    order = list(range(num_shards))
    if shuffle:
        random.Random(f"shards-{seed}-{epoch}").shuffle(order)  # str seeds hash with sha512: stable across runs
    return order


def rank_range(total: int, rank: int, world_size: int, *, per_rank: int = 0) -> Tuple[int, int]:
    """Contiguous [lo, hi) of the epoch sequence for one rank.

    per_rank > 0 (training): every rank takes exactly per_rank samples, the tail beyond world_size * per_rank
    is not read this epoch. per_rank == 0 (evaluation): `total` is split as evenly as possible.
    """
    if per_rank:
        return rank * per_rank, (rank + 1) * per_rank
    return rank * total // world_size, (rank + 1) * total // world_size


def worker_ranges(lo: int, hi: int, batch_size: int, num_workers: int) -> List[Tuple[int, int]]:
    """Split a rank's [lo, hi) into one contiguous range per worker, sized to that worker's batches.

    The last batch of the rank may be partial (evaluation); its worker's range is shortened accordingly.
    """
    n = hi - lo
    num_batches = -(-n // batch_size)
    sizes = [batches_of(w, num_workers, num_batches) * batch_size for w in range(num_workers)]
    if num_batches:
        sizes[(num_batches - 1) % num_workers] -= num_batches * batch_size - n
    out, start = [], lo
    for size in sizes:
        out.append((start, start + size))
        start += size
    return out


def segments(counts: Sequence[int], order: Sequence[int], lo: int, hi: int) -> List[Segment]:
    """The shard pieces that cover [lo, hi) of the sequence formed by shards `order` with sizes `counts`."""
    out, offset = [], 0
    for shard in order:
        begin, end = max(lo, offset), min(hi, offset + counts[shard])
        if begin < end:
            out.append(Segment(shard, begin - offset, end - offset))
        offset += counts[shard]
        if offset >= hi:
            break
    return out
