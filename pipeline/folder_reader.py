"""Reading image-folder shards: a group of plain image files, each one member keyed by its path.

The key is the file's path relative to the folder without its extension (``a.png`` beside
``a.jpg``: the later one keeps its full name). Each file is one ranged read of at most the
member cap plus one byte, so an oversized file is a ``MemberTooLarge`` dead letter without
being read whole; a file gone by the time it is read (deleted since the listing, a dangling
symbolic link) is a ``FileNotFound`` dead letter; any other storage failure raises
:class:`~pipeline.shard_file.ShardReadError`.
"""
from __future__ import annotations

from collections.abc import Iterator

import fsspec

from vae_model.storage import StorageOptions, get_fs

from .members import MemberBuilder, Problem, ReadLimits, ShardTally, too_large
from .shard_file import read_failure
from .shard_listing import rel_path
from .shards import Member, ShardSpec


def iter_images(spec: ShardSpec, storage_options: StorageOptions, limits: ReadLimits,
                tally: ShardTally) -> Iterator[Member]:
    folder = spec.name.rsplit("/", 1)[0]
    builder = MemberBuilder()
    tally.members += len(spec.urls)
    cap = limits.max_member_bytes
    for url in spec.urls:
        rel = rel_path(url, folder)
        stem, _, ext = rel.rpartition(".")
        key = stem or rel
        if builder.has(key):  # a.png and a.jpg side by side: keep both, the later one by full name
            key = rel
        fs, path = get_fs(url, storage_options)
        error: Problem | None = None
        try:
            # One ranged read: never more than the cap (+1 byte to tell "over") in memory.
            data: bytes | None = fs.cat_file(path, start=0, end=cap + 1)
        except FileNotFoundError:  # deleted since the listing, or a dangling symbolic link: this image only
            yield builder.image_member(key, None, ext.lower(), Problem(
                "FileNotFound", f"{rel}: listed but gone when read (deleted since the listing, or a dangling link)"))
            continue
        except Exception as exc:  # storage backends raise many types
            raise read_failure(url, exc) from exc
        if data is not None and len(data) > cap:
            size = _file_size(fs, path)
            data, error = None, too_large(rel, size if size is not None else len(data), cap, "--max-member-bytes")
        yield builder.image_member(key, data, ext.lower(), error)


def _file_size(fs: fsspec.AbstractFileSystem, path: str) -> int | None:
    try:
        return fs.size(path)
    except Exception:  # only for the message
        return None
