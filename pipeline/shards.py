"""Image shards: the one reader shared by training and the Beam pipeline (public face).

Three shard formats are read, from any fsspec URL (local, ``file://``, ``memory://``, ``s3://``):

* ``tar`` (``.tar``, ``.tar.gz``, ``.tgz``) in the WebDataset convention: files are grouped by
  *key*, the member path up to the first dot of its file name (``sub/abc.png``, ``sub/abc.cls``
  and ``sub/abc.json`` form member ``sub/abc``). The image is the file with a
  :data:`~pipeline.decode.SUPPORTED_EXTS` extension; ``.cls`` holds an integer label and
  ``.json`` a metadata object; other files (captions, ...) beside an image are ignored.
  Tars are read as a stream (``r|*``), one member at a time.
* ``parquet``: one row per image, read in batches of 256 rows. Columns, first match wins:
  image ``image|img|png|jpg|bytes|data`` (binary, or a struct with a ``bytes`` field as written
  by Hugging Face ``datasets``), key ``key|__key__|id``, label ``label|cls|class``,
  metadata ``json|meta`` (a JSON string or a struct).
* ``images``: plain image files under a folder, grouped ``images_per_group`` at a time.

Files and folders whose names start with ``.`` are ignored everywhere (temporary files,
macOS ``._*`` resource forks).

Keys are :func:`escape_key`-escaped (bytes that are not UTF-8 as ``%XX``, ``%`` as ``%25``;
:func:`unescape_key` reverses it), so a Latin-1 file name is a row, not a job failure. A tar
key group ends where the key changes or a suffix repeats (``a.png, a.png`` are two members,
the second a ``DuplicateKey``). Hard links are read from their earlier target; symbolic links,
FIFOs and devices named like images or sidecars are ``NotARegularFile``. Member sizes are
checked against :class:`ReadLimits` before the bytes are read (``MemberTooLarge``); labels
must fit int64 and metadata must be strict JSON (no NaN). What a shard contains is counted
into a :class:`ShardTally` apart from what is yielded, so the two can be reconciled.

Problems with the *bytes*, confined to one member (no image, a bad label) or to a whole shard
(not a tar, corrupt gzip, truncated as stored, not a Parquet file) never raise: they come back
as a :class:`Member` with ``error`` set, so the caller can write a dead-letter row and carry on.
A failure of the *storage* (an S3 error after its retries, a timeout, a file gone since it was
listed, an I/O error of the disk) is not a property of the data: it raises
:class:`ShardReadError`, so the shard is not committed and a rerun reads it again.

Where each job lives (this module defines the two records and dispatches; it re-exports the
public names of the others, lazily, because they import the records from here):

* :mod:`pipeline.shard_listing`: :func:`expand_shards`, which files are shards (``TAR_SUFFIXES``);
* :mod:`pipeline.shard_file`: opening a shard's file (:class:`ShardReadError`; one
  ``UnreadableShard`` dead letter when its format cannot be parsed);
* :mod:`pipeline.tar_reader`, :mod:`pipeline.parquet_reader`, :mod:`pipeline.folder_reader`: one
  reader per format;
* :mod:`pipeline.members`: building members (keys, labels, metadata, dead letters), :class:`ReadLimits`,
  :class:`ShardTally`;
* :mod:`pipeline.convert`: :func:`write_shards`, IDX files and image folders into shards.
"""
from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vae_model.errors import ShardError
from vae_model.storage import StorageOptions

if TYPE_CHECKING:  # for type checkers; at run time __getattr__ below resolves these names
    from .convert import write_shards  # noqa: F401
    from .members import ReadLimits, ShardTally, escape_key, printable, unescape_key  # noqa: F401
    from .parquet_reader import (IMAGE_COLUMNS, KEY_COLUMNS, LABEL_COLUMNS, META_COLUMNS,  # noqa: F401
                                 PARQUET_BATCH_ROWS)
    from .shard_file import ShardReadError  # noqa: F401
    from .shard_listing import TAR_SUFFIXES, expand_shards  # noqa: F401

# Public names defined in the modules that import ShardSpec/Member from here: resolved on first use.
_EXPORTS = {
    "expand_shards": "shard_listing", "TAR_SUFFIXES": "shard_listing",
    "ShardReadError": "shard_file",
    "ReadLimits": "members", "ShardTally": "members", "escape_key": "members", "unescape_key": "members",
    "printable": "members",
    "PARQUET_BATCH_ROWS": "parquet_reader", "IMAGE_COLUMNS": "parquet_reader", "KEY_COLUMNS": "parquet_reader",
    "LABEL_COLUMNS": "parquet_reader", "META_COLUMNS": "parquet_reader",
    "write_shards": "convert",
}
__all__ = ["Member", "ShardSpec", "iter_members", *_EXPORTS]


@dataclass(frozen=True)
class ShardSpec:
    """One unit of work: a tar or Parquet file, or a group of image files."""

    name: str  # stable URL-like id: the file's URL, or f"{folder_url}/images-{i:05d}"
    format: str  # "tar" | "parquet" | "images"
    urls: tuple[str, ...]  # (url,) for tar/parquet; the group's sorted image URLs for "images"


@dataclass(frozen=True)
class Member:
    """One image of a shard, or one problem to report as a dead letter."""

    key: str  # unique within the shard
    index: int  # 0-based position in the shard, in yield order
    data: bytes | None  # encoded image bytes; None when error is set
    ext: str  # lower-case image extension ("png", ...) or ""
    label: int | None
    meta: dict | None
    error: str | None = None
    error_type: str | None = None


def iter_members(spec: ShardSpec, storage_options: StorageOptions = None, limits: ReadLimits | None = None,
                 tally: ShardTally | None = None) -> Iterator[Member]:
    """Stream the members of one shard; never holds more than one member's bytes (one batch for Parquet).

    Shard-level problems yield one final error member instead of raising: key ``__truncated__``
    (``TruncatedShard``) after the members read before the damage, or key ``__shard__``
    (``UnreadableShard``, ``NoImageColumn``) when nothing can be read. Keys are
    :func:`escape_key`-escaped. ``limits`` (default :meth:`ReadLimits.default`) caps member sizes;
    ``tally``, if given, is filled in with what the shard contains as it is read.

    Raises:
        ShardReadError: Storage failed to deliver the shard's bytes (while opening or reading it).
    """
    from . import folder_reader, parquet_reader, tar_reader  # they import Member from here
    from .members import ReadLimits, ShardTally

    readers = {"tar": tar_reader.iter_tar, "parquet": parquet_reader.iter_parquet,
               "images": folder_reader.iter_images}
    read = readers.get(spec.format)
    if read is None:
        raise ShardError(f"unknown shard format {spec.format!r} for {spec.name}: expected tar, parquet or images")
    return read(spec, storage_options, limits or ReadLimits.default(), tally if tally is not None else ShardTally())


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__package__}.{module}"), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
