"""Queries by image against a vector index: encode with the index's model, and read back stored images.

:class:`SearchableIndex` is what :func:`pipeline.index.open_index` returns: the index plus, on
first use, the checkpoint that wrote its rows, so images are encoded exactly as ``vaepipe embed``
encodes them (:func:`pipeline.decode.decode_image`, then the posterior mean:
``score_batch(..., score="none")``). :func:`stored_images` decodes indexed rows from their shards
by key, for pictures of the neighbours.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from pipeline.index import Hit, VectorIndexError, VectorIndex
from vae_model.storage import StorageOptions


class SearchableIndex:
    """A :class:`~pipeline.index.VectorIndex` that also takes images as queries."""

    def __init__(self, index: VectorIndex, checkpoint: str | None = None, storage_options: StorageOptions = None):
        self.index = index
        self.checkpoint_url = checkpoint or index.meta.get("checkpoint")
        self.storage_options = storage_options
        self._ckpt = None

    def __len__(self) -> int:
        return len(self.index)

    @property
    def meta(self) -> dict:
        return self.index.meta

    def search(self, queries: np.ndarray | Sequence[bytes], k: int = 10) -> list[list[Hit]]:
        """Nearest rows of each query: vectors (Q, D) float, images (Q, C, H, W) uint8, or encoded image bytes."""
        if isinstance(queries, np.ndarray) and queries.dtype != np.uint8:
            return self.index.search(queries, k)
        return self.index.search(self.encode(queries), k)

    def search_key(self, key: str, k: int = 10) -> list[Hit]:
        return self.index.search_key(key, k)

    # -- the model -------------------------------------------------------------------------
    @property
    def checkpoint(self):
        if self._ckpt is None:
            from vae_model.checkpoint import load_checkpoint

            if not self.checkpoint_url:
                raise VectorIndexError("the index does not name its checkpoint; pass --checkpoint")
            ckpt = load_checkpoint(self.checkpoint_url, self.storage_options)
            if ckpt.model_id != self.index.meta.get("model_id"):
                raise VectorIndexError(f"{self.checkpoint_url} is model {ckpt.model_id}, but the index holds model "
                                  f"{self.index.meta.get('model_id')}: query with the model that wrote it")
            self._ckpt = ckpt
        return self._ckpt

    def pixels(self, images: np.ndarray | Sequence[bytes]) -> np.ndarray:
        """uint8 (Q, C, H, W) at the model's size: encoded bytes are decoded as ``vaepipe embed`` does."""
        if isinstance(images, np.ndarray):
            return np.require(images, np.uint8, ["C", "W"])  # torch wants writable memory
        from pipeline.decode import decode_image
        from pipeline.options import trained_resize

        cfg, resize = self.checkpoint.config, trained_resize(self.checkpoint.meta)
        return np.stack([decode_image(b, cfg.channels, cfg.image_size, resize=resize) for b in images])

    def encode(self, images: np.ndarray | Sequence[bytes]) -> np.ndarray:
        """Posterior means (Q, D) of images, with the index's model."""
        from vae_model.scoring import ScoreOptions, for_scoring, score_batch

        model = for_scoring(self.checkpoint.model)
        return score_batch(model, self.pixels(images), None, ScoreOptions(score="none"))["embedding"]


def stored_images(hits: Sequence[Hit], channels: int, size: int, storage_options: StorageOptions = None
                  ) -> list[np.ndarray]:
    """The images of indexed rows, uint8 (C, H, W), decoded from their shards (read once per shard)."""
    from pipeline.decode import decode_image
    from pipeline.members import unescape_key
    from pipeline.shards import expand_shards, iter_members

    wanted: dict[str, dict[str, int]] = {}
    for i, h in enumerate(hits):
        wanted.setdefault(h.shard, {})[h.key[len(h.shard) + 1:]] = i
    out: list[np.ndarray | None] = [None] * len(hits)
    for shard, members in wanted.items():
        name = unescape_key(shard)
        specs = [s for s in expand_shards(name, storage_options) if s.name == name] or \
                [s for s in expand_shards(name.rsplit("/", 1)[0], storage_options) if s.name == name]
        if not specs:
            raise VectorIndexError(f"shard {name} of the index's rows is gone")
        for m in iter_members(specs[0], storage_options):
            if m.key in members and m.data is not None:
                out[members[m.key]] = decode_image(m.data, channels, size)
    missing = [hits[i].key for i, x in enumerate(out) if x is None]
    if missing:
        raise VectorIndexError(f"{missing[0]}: not found in its shard any more ({len(missing)} missing)")
    return out  # type: ignore[return-value]
