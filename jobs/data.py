"""Training data: a streaming torch IterableDataset over image shards.

Shards are listed once; each DataLoader worker streams its share (whole shards when there are
enough of them, else every n-th member of every shard), decodes with the same policy as the
pipeline, and shuffles through a bounded buffer. Order is a pure function of (seed, epoch,
num_workers), which makes ``--resume`` exact. A member the reader reports as a dead letter (bad
bytes) is skipped with a warning; a shard that storage cannot deliver (``ShardReadError``) fails
training with one line, also from a DataLoader worker process, rather than train on less data.
"""
from __future__ import annotations

import hashlib
import logging
import random
from typing import Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.decode import decode_image
from pipeline.members import escape_key
from pipeline.options import DEFAULT_RESIZE
from pipeline.shard_listing import expand_shards
from pipeline.shards import ShardSpec, iter_members
from vae_model.errors import ImageDecodeError, worker_error
from vae_model.storage import StorageOptions, get_fs

log = logging.getLogger(__name__)


def in_validation(shard: str, key: str, fraction: float, seed: int) -> bool:
    """Deterministic hash split: the same image is always on the same side, wherever its shard is
    stored (the hash uses the shard's file name, not its folder or bucket: a copy of the data on
    another disk or in object storage splits the same way)."""
    if fraction <= 0:
        return False
    name = escape_key(shard.rstrip("/").rsplit("/", 1)[-1])  # a Latin-1 file name hashes too
    h = hashlib.blake2b(f"{seed}:{name}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2 ** 64 < fraction


def fingerprint(specs: list[ShardSpec], storage_options: StorageOptions = None) -> str:
    """sha256 over every shard file's URL, size and version tag (ETag/mtime where available)."""
    h = hashlib.sha256()
    for spec in specs:
        for url in spec.urls:
            fs, path = get_fs(url, storage_options)
            try:
                info = fs.info(path)
            except Exception:  # a file we cannot stat still contributes its name
                info = {}
            tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
            h.update(f"{escape_key(url)}\0{info.get('size', '')}\0{tag}\n".encode())
    return h.hexdigest()[:32]


class ShardImageDataset(IterableDataset):
    """Yields uint8 image tensors (C, H, W) from shards.

    Args:
        specs: shards from :func:`pipeline.shard_listing.expand_shards`.
        split: "train" (hash not in validation), "val" (hash in validation) or "all".
        shuffle_buffer: 0 disables shuffling (validation).
        resize: the decode's resize policy (:data:`pipeline.options.RESIZE_POLICIES`); a model's
            data is read with the policy it was trained with (:func:`pipeline.options.trained_resize`).
    """

    def __init__(self, specs: list[ShardSpec], channels: int, size: int, split: str = "all",
                 val_fraction: float = 0.0, seed: int = 0, shuffle_buffer: int = 0,
                 storage_options: StorageOptions = None, resize: str = DEFAULT_RESIZE) -> None:
        super().__init__()
        assert split in ("train", "val", "all")
        self.specs, self.channels, self.size, self.resize = list(specs), channels, size, resize
        self.split, self.val_fraction, self.seed = split, val_fraction, seed
        self.shuffle_buffer, self.storage_options = shuffle_buffer, storage_options
        self.epoch = 0
        self.skipped = 0  # unreadable images met so far by this process (DataLoader workers count their own)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _members(self, wid: int, nw: int) -> Iterator[torch.Tensor]:
        specs = list(self.specs)
        if self.shuffle_buffer:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(specs)
        by_shard = len(specs) >= nw
        mine = specs[wid::nw] if by_shard else specs
        before = self.skipped
        for spec in mine:
            for i, m in enumerate(iter_members(spec, self.storage_options)):
                if not by_shard and i % nw != wid:
                    continue
                keep = self.split == "all" or (self.split == "val") == in_validation(
                    spec.name, m.key, self.val_fraction, self.seed)
                if not keep:
                    continue
                if m.error is not None or m.data is None:
                    self.skipped += 1
                    log.warning("skipping %s/%s: %s", spec.name, m.key, m.error)
                    continue
                try:
                    arr = decode_image(m.data, self.channels, self.size, resize=self.resize)
                except ImageDecodeError as exc:
                    self.skipped += 1
                    log.warning("skipping %s/%s: %s", spec.name, m.key, exc)
                    continue
                yield torch.from_numpy(arr if arr.flags.writeable else arr.copy())
        if self.skipped > before:
            log.warning("worker %d skipped %d unreadable images this epoch", wid, self.skipped - before)

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        it = self._members(wid, nw) if info is None else _marked(self._members(wid, nw))
        if not self.shuffle_buffer:
            yield from it
            return
        rng = random.Random(f"{self.seed}:{self.epoch}:{wid}")
        buf: list[torch.Tensor] = []
        for item in it:
            if len(buf) < self.shuffle_buffer:
                buf.append(item)
                continue
            j = rng.randrange(len(buf))
            buf[j], item = item, buf[j]
            yield item
        rng.shuffle(buf)
        yield from buf


def _marked(it: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """``it`` with a failure raised as :func:`~vae_model.errors.worker_error`: in a DataLoader
    worker process, so that the trainer's one error line is the cause (a storage failure reading
    a shard, ...), not the "Caught ... in DataLoader worker process 0" that torch wraps it in."""
    try:
        yield from it
    except Exception as exc:
        raise worker_error(exc) from exc


def load_tensor(dataset: ShardImageDataset, limit: int | None = None) -> torch.Tensor:
    """Materialise (up to ``limit``) images of a dataset as one uint8 tensor (N, C, H, W)."""
    out = []
    for i, x in enumerate(dataset):
        if limit is not None and i >= limit:
            break
        out.append(x)
    if not out:
        return torch.empty((0, dataset.channels, dataset.size, dataset.size), dtype=torch.uint8)
    return torch.stack(out)


def list_specs(url: str, storage_options: StorageOptions = None) -> list[ShardSpec]:
    return expand_shards(url, storage_options)
