"""Converting images into shards (``vaepipe shards``): IDX files and image folders to tar or Parquet.

The only user of :mod:`pipeline.idx`; the readers of these shards are :mod:`pipeline.shards`.
"""
from __future__ import annotations

import io
import itertools
import logging
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from vae_model.errors import NoShardsError, ShardError, StorageError
from vae_model.storage import StorageOptions, atomic_write_bytes, describe_storage_error, get_fs, join, unstrip

from .decode import SUPPORTED_EXTS
from .idx import is_idx_url, labels_url_for, read_idx
from .members import escape_key
from .shard_listing import list_files, rel_path, suffix_kind, warn_ignored

log = logging.getLogger(__name__)

_SHARD_NAME = re.compile(r"shard-\d{6}\.(tar|parquet)$")
_Record = tuple[str, str, bytes, int | None]  # key, ext, encoded image, label


def write_shards(source: str, out_url: str, fmt: str = "tar", shard_size: int = 1000, limit: int | None = None,
                 storage_options: StorageOptions = None, progress: Callable[[int], Any] | None = None) -> list[str]:
    """Write ``shard-{n:06d}.tar`` or ``.parquet`` files under ``out_url``; return their URLs.

    Args:
        source: An IDX images file (``*-idx3-ubyte[.gz]``; the ``labels-idx1-ubyte`` file beside it,
            if any, supplies labels) or a folder, prefix or glob of image files.
        out_url: Output folder. Shards already there with the names written are replaced; other
            ``shard-*`` files there make this fail rather than leave a mixed data set.
        fmt: ``"tar"`` (WebDataset: ``{key}.{ext}`` plus ``{key}.cls``) or ``"parquet"``
            (columns ``key``, ``image``, ``label``; zstd).
        shard_size: Images per shard.
        limit: Write at most this many images.
        storage_options: fsspec options for both ``source`` and ``out_url``.
        progress: Called after each shard with the number of images that shard holds.

    IDX images become lossless PNGs (grayscale, or RGB for ``(N, H, W, 3)``) keyed ``{i:08d}``;
    image files are copied byte for byte, keyed by their path relative to the folder without the
    extension (dots in the file name become ``_``). Each shard is built in memory and written
    atomically; tar members carry fixed metadata, so the same input gives byte-identical shards.
    """
    if fmt not in ("tar", "parquet"):
        raise ShardError("--format must be tar or parquet")
    if shard_size < 1:
        raise ShardError(f"--shard-size must be at least 1, got {shard_size}")
    if limit is not None and limit < 1:
        raise ShardError(f"--limit must be at least 1, got {limit}")
    if is_idx_url(source):
        total, records = _idx_records(source, limit, storage_options)
    else:
        total, records = _image_records(source, limit, storage_options)
    names = [f"shard-{n:06d}.{fmt}" for n in range(-(-total // shard_size))]
    _check_no_stale_shards(out_url, set(names), storage_options)
    urls: list[str] = []
    for name in names:
        chunk = list(itertools.islice(records, shard_size))
        url = join(out_url, name)
        atomic_write_bytes(url, _tar_bytes(chunk) if fmt == "tar" else _parquet_bytes(chunk), storage_options)
        urls.append(url)
        log.info("wrote %s (%s images)", url, len(chunk))
        if progress is not None:
            progress(len(chunk))
    return urls


def _idx_records(source: str, limit: int | None, storage_options: StorageOptions) -> tuple[int, Iterator[_Record]]:
    if re.search(r"labels[-.]idx1", source.lower()):
        raise ShardError(f"{source} holds labels, not images: pass the matching *-images-idx3-ubyte file")
    images = read_idx(source, storage_options)
    shape = images.shape
    if images.ndim == 4 and shape[-1] == 1:
        images = images[..., 0]
    if images.dtype != np.uint8 or not (images.ndim == 3 or (images.ndim == 4 and shape[-1] == 3)):
        raise ShardError(f"{source}: IDX images must be unsigned bytes shaped (N, H, W) or (N, H, W, 3), "
                         f"got {images.dtype} {shape}")
    labels = None
    labels_url = labels_url_for(source, storage_options)
    if labels_url is not None:
        labels = read_idx(labels_url, storage_options)
        if labels.ndim != 1 or len(labels) != len(images) or labels.dtype.kind not in "iu":
            raise ShardError(f"{labels_url}: expected {len(images)} integer labels, got {labels.dtype} {labels.shape}")
        log.info("labels from %s", labels_url)
    n = len(images) if limit is None else min(limit, len(images))
    if n == 0:
        raise ShardError(f"{source} contains no images")

    def records() -> Iterator[_Record]:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(images[i]).save(buf, format="PNG")
            yield f"{i:08d}", "png", buf.getvalue(), None if labels is None else int(labels[i])

    return n, records()


def _image_records(source: str, limit: int | None, storage_options: StorageOptions) -> tuple[int, Iterator[_Record]]:
    fs, root, files = list_files(source, storage_options)
    paths, others = [], []
    for p in files:
        (paths if suffix_kind(p) == "images" else others).append(p)
    if not paths:
        raise NoShardsError(f"no image files matched {source} (expected an IDX *-images-idx3-ubyte[.gz] file "
                            f"or a folder or glob of .{', .'.join(SUPPORTED_EXTS)} files)")
    warn_ignored(fs, source, others)
    paths = paths[:limit]

    def records() -> Iterator[_Record]:
        used: set[str] = set()
        for path in paths:
            stem, _, ext = rel_path(path, root).rpartition(".")
            folder, _, base = stem.rpartition("/")
            key = f"{folder}/{base.replace('.', '_')}" if folder else base.replace(".", "_")
            candidate, n = key, 1
            while candidate in used:  # a.png beside a.jpg
                candidate, n = f"{key}_{ext.lower()}" + (f"_{n}" if n > 1 else ""), n + 1
            used.add(candidate)
            try:
                data = fs.cat_file(path)
            except Exception as exc:  # storage backends raise many types
                raise StorageError(describe_storage_error(unstrip(fs, path), exc)) from None
            yield candidate, ext.lower(), data, None

    return len(paths), records()


def _check_no_stale_shards(out_url: str, names: set[str], storage_options: StorageOptions) -> None:
    fs, path = get_fs(out_url, storage_options)
    try:
        existing = fs.glob(path.rstrip("/") + "/shard-*") if fs.isdir(path) else []
    except Exception as exc:  # storage backends raise many types
        raise StorageError(describe_storage_error(out_url, exc)) from None
    stale = sorted(p.rsplit("/", 1)[-1] for p in existing if _SHARD_NAME.search(p))
    stale = [s for s in stale if s not in names]
    if stale:
        raise ShardError(f"{out_url} already holds {len(stale)} shard(s) this run would not replace "
                         f"(e.g. {stale[0]}); write to an empty folder or delete them first")


def _tar_bytes(records: Iterable[_Record]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for key, ext, data, label in records:
            _add_tar_file(tf, f"{key}.{ext}", data)
            if label is not None:
                _add_tar_file(tf, f"{key}.cls", str(label).encode())
    return buf.getvalue()


def _add_tar_file(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tf.addfile(info, io.BytesIO(data))


def _parquet_bytes(records: list[_Record]) -> bytes:
    table = pa.table({
        "key": pa.array([escape_key(r[0]) for r in records], pa.string()),  # Latin-1 file names
        "image": pa.array([r[2] for r in records], pa.binary()),
        "label": pa.array([r[3] for r in records], pa.int64()),
    })
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=min(1000, max(1, len(records))))
    return sink.getvalue().to_pybytes()
