"""An in-memory data set of precomputed feature vectors with DataInfo's interface (linear probes on cached
features): seeded shuffle per epoch, an equal number of batches on every rank, restorable position."""
import math

import torch

__all__ = ["FeatureData"]


class FeatureData:
    """features: (n, D), labels: (n,), the same on every rank; each rank reads its own strided share."""

    def __init__(self, features, labels, batch_size, *, seed=0, rank=0, world_size=1, is_training=True):
        if features.shape[0] != labels.shape[0]:
            raise ValueError(f"{features.shape[0]} feature rows but {labels.shape[0]} labels")
        self.features, self.labels = features, labels
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.is_training = is_training
        self.num_samples = features.shape[0]
        self.classes = None
        if is_training:
            self.steps_per_epoch = self.num_samples // (batch_size * world_size)
        else:
            self.steps_per_epoch = math.ceil(len(range(rank, self.num_samples, world_size)) / batch_size)
        self.epoch, self.batches_done = 0, 0

    def set_epoch(self, epoch):
        if epoch != self.epoch:
            self.epoch, self.batches_done = epoch, 0

    def state_dict(self):
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state):
        self.epoch, self.batches_done = state["epoch"], state["batches_done"]

    def skipped(self):
        return 0

    def _indices(self):
        if not self.is_training:
            return torch.arange(self.rank, self.num_samples, self.world_size)
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return order[self.rank::self.world_size][:self.steps_per_epoch * self.batch_size]

    @property
    def loader(self):
        return self._iterate()

    def _iterate(self):
        indices = self._indices()
        start = self.batches_done
        if not self.is_training:
            start = 0
        for b in range(start, self.steps_per_epoch):
            idx = indices[b * self.batch_size:(b + 1) * self.batch_size]
            self.batches_done = b + 1
            yield {"features": self.features[idx], "label": self.labels[idx]}
        if self.is_training:
            self.batches_done = self.steps_per_epoch
        else:
            self.batches_done = 0
