"""Thumbnails for the run report: chosen rows' images read back from their shards.

A row names its shard (``shard``, escaped) and its position there (``index``); the shard is
streamed with :func:`pipeline.shards.iter_members` up to the last wanted position and each
wanted image is decoded the way the model saw it (:func:`pipeline.decode.decode_image`: same
channels, size and bounds), then inlined as a PNG data URI.
"""
from __future__ import annotations

import base64
import io
import logging
from collections import defaultdict
from typing import Any

import numpy as np
from PIL import Image

from pipeline.decode import decode_image
from pipeline.shards import ShardSpec, iter_members
from vae_model.storage import StorageOptions

log = logging.getLogger(__name__)


def thumbnails(rows: list[dict[str, Any]], image_shape: tuple[int, int], data_url: str | None,
               storage_options: StorageOptions = None) -> tuple[dict[tuple[str, int], str], list[str]]:
    """``({(shard, index): data URI}, notes)`` for the given rows (dicts with ``shard``, ``index``).

    A shard that cannot be found or read again (moved since the run, storage down) gives a note
    instead of thumbnails; the report is still written."""
    wanted: dict[str, set[int]] = defaultdict(set)
    for r in rows:
        wanted[r["shard"]].add(int(r["index"]))
    specs = _specs(set(wanted), data_url, storage_options)
    out: dict[tuple[str, int], str] = {}
    notes: list[str] = []
    channels, size = image_shape
    for shard, indices in sorted(wanted.items()):
        spec = specs.get(shard)
        if spec is None:
            notes.append(f"shard {shard} not found again: no thumbnails from it")
            continue
        last = max(indices)
        try:
            for m in iter_members(spec, storage_options):
                if m.index in indices and m.data is not None:
                    try:
                        out[(shard, m.index)] = png_data_uri(decode_image(m.data, channels, size))
                    except Exception as exc:  # it decoded when it was scored; changed since?
                        notes.append(f"{shard}/{m.key}: {type(exc).__name__}: {exc}")
                if m.index >= last:
                    break
        except Exception as exc:  # storage failures: no thumbnails from this shard, the report goes on
            notes.append(f"shard {shard} not readable ({type(exc).__name__}: {exc}): no thumbnails from it")
    return out, notes


def _specs(shards: set[str], data_url: str | None, storage_options: StorageOptions) -> dict[str, ShardSpec]:
    """The ShardSpec of each escaped shard name: tar and Parquet files from their names alone,
    image groups (and anything else) by listing the run's ``data_url`` again."""
    from pipeline.shards import TAR_SUFFIXES, escape_key, expand_shards, unescape_key

    specs: dict[str, ShardSpec] = {}
    for shard in shards:
        name = unescape_key(shard)
        if name.endswith(TAR_SUFFIXES):
            specs[shard] = ShardSpec(name, "tar", (name,))
        elif name.endswith(".parquet"):
            specs[shard] = ShardSpec(name, "parquet", (name,))
    if len(specs) < len(shards) and data_url:
        try:
            specs.update({escape_key(s.name): s for s in expand_shards(data_url, storage_options)})
        except Exception as exc:
            log.warning("report: cannot list %s again for thumbnails: %s", data_url, exc)
    return specs


def png_data_uri(pixels: np.ndarray) -> str:
    """``(C, H, W)`` uint8 pixels as a ``data:image/png;base64,...`` URI."""
    arr = pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
