"""Where a training epoch's batches come from: the shard stream, or the decoded images in memory.

Epoch 1 streams and decodes the shards; when the decoded training split fits in
``cache_bytes`` it is kept, and later epochs draw shuffled batches from memory (no decoding on
the training cores). A run resumed after epoch 1 replays epoch 1's stream to rebuild the same
images in the same order, so that it continues exactly where it stopped.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch
from torch.utils.data import DataLoader

from jobs.data import ShardImageDataset


def epoch_batches(train_ds: ShardImageDataset, cache: torch.Tensor | None, loader_kw: dict[str, Any],
                  seed: int, epoch: int) -> Iterable[torch.Tensor]:
    """The batches of ``epoch``: from ``cache`` when there is one, else streamed from the shards."""
    train_ds.set_epoch(epoch)
    if cache is None:
        return DataLoader(train_ds, **loader_kw)
    return _memory_batches(cache, loader_kw["batch_size"], seed, epoch)


def _memory_batches(cache: torch.Tensor, batch_size: int, seed: int, epoch: int) -> Iterator[torch.Tensor]:
    """Batches of the in-memory training split in a fresh order per (seed, epoch)."""
    perm = torch.randperm(len(cache), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    for i in range(0, len(cache), batch_size):
        yield cache[perm[i:i + batch_size]]


class Collector:
    """Keeps the batches it is given while they fit in ``budget`` elements (uint8: bytes)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.parts: list[torch.Tensor] | None = []
        self.size = 0

    def add(self, x: torch.Tensor) -> None:
        if self.parts is None:
            return
        self.parts.append(x)
        self.size += x.numel()
        if self.size > self.budget:
            self.parts = None

    def images(self) -> torch.Tensor | None:
        """All the batches kept, concatenated; None when they did not fit or there were none."""
        return torch.cat(self.parts) if self.parts else None


def fill_cache(train_ds: ShardImageDataset, loader_kw: dict[str, Any], budget: int) -> torch.Tensor | None:
    """Replay epoch 1's stream into memory (resume after epoch 1 needs the same images in the same order)."""
    train_ds.set_epoch(0)
    keep = Collector(budget)
    for x in DataLoader(train_ds, **loader_kw):
        keep.add(x)
        if keep.parts is None:
            return None
    return keep.images()
