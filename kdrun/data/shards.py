"""A process's share of each batch of an in-memory loader, for one run over several processes
(kdrun/distributed.py); an image folder takes its share in its sampler instead (FolderLoader.take_share)."""
from __future__ import annotations


class ShardedLoader:
    """This process's share of each batch of `loader`: the same batches as one process draws, sliced into N
    contiguous parts. `grad_scale` is the factor on this process's loss that makes DDP's average of the N
    gradients the gradient of the whole batch's mean loss (N x its share of the batch)."""

    sharded = True

    def __init__(self, loader, rank: int, size: int):
        self.loader, self.rank, self.size = loader, rank, size
        self.grad_scale = 1.0

    def __getattr__(self, name):  # num_samples, generator, labels, augmentation, ... of the whole loader
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, labels, index in self.loader:
            n = labels.shape[0]
            lo, hi = n * self.rank // self.size, n * (self.rank + 1) // self.size
            self.grad_scale = self.size * (hi - lo) / n
            yield images[lo:hi], labels[lo:hi], index[lo:hi]
