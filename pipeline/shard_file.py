"""Opening a shard's file: storage failures raise, a format that cannot be parsed is one dead letter.

Every byte a reader takes from storage comes through a :class:`StorageFile` (or, for image
folders, :func:`read_failure` around the ranged read), so the line between the two kinds of
failure is drawn once: what the storage layer raises (s3fs's ``OSError`` for SlowDown after its
retries, a timeout, ``FileNotFoundError`` for a file gone since it was listed, ``EIO``) becomes
:class:`ShardReadError` and fails the shard, to be read again by a rerun; what the format parsers
above it raise about the bytes (not a tar, corrupt gzip, truncated as stored, not a Parquet file)
is a dead letter.
"""
from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from vae_model.errors import StorageError
from vae_model.storage import StorageOptions, describe_storage_error, get_fs

from .members import ShardTally, dead_letter, printable, reason
from .shards import Member, ShardSpec

log = logging.getLogger(__name__)

T = TypeVar("T")


class ShardReadError(StorageError):
    """Storage could not deliver a shard's bytes (after the storage layer's own retries).

    Not a dead letter: the data may be fine, so the shard fails, the run fails with this one
    line, and a rerun reads the shard again. Not an ``OSError`` either, so the handlers that turn
    bad bytes into dead letters (``TAR_ERRORS``, ``PARQUET_ERRORS``) let it through.
    """


def read_failure(url: str, exc: BaseException) -> ShardReadError:
    """The :class:`ShardReadError` for a storage exception while reading ``url``."""
    return ShardReadError(f"{describe_storage_error(url, exc)} (storage failure while reading a shard: "
                          "nothing of it was committed; rerun once storage is back)")


class StorageFile(io.RawIOBase):
    """A shard file as fsspec opened it, whose reads re-raise any storage failure as :class:`ShardReadError`.

    The format parsers above it (``tarfile``, gzip, pyarrow) judge the bytes; everything this
    layer raises is about fetching them, whatever type the backend uses for it.
    """

    def __init__(self, f: Any, url: str) -> None:
        super().__init__()
        self._f, self.url = f, url

    @classmethod
    def open(cls, url: str, storage_options: StorageOptions) -> StorageFile:
        fs, path = get_fs(url, storage_options)
        try:
            return cls(fs.open(path, "rb"), url)
        except Exception as exc:  # storage backends raise many types
            raise read_failure(url, exc) from exc

    def _call(self, method: Callable, *args: Any) -> Any:
        try:
            return method(*args)
        except Exception as exc:  # storage backends raise many types
            raise read_failure(self.url, exc) from exc

    def read(self, size: int = -1) -> bytes:
        return self._call(self._f.read, size)

    def readinto(self, buffer: Any) -> int:
        return self._call(self._f.readinto, buffer)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._call(self._f.seek, offset, whence)

    def tell(self) -> int:
        return self._call(self._f.tell)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            try:
                self._call(self._f.close)
            finally:
                super().close()


def read_shard(spec: ShardSpec, storage_options: StorageOptions, tally: ShardTally, what: str,
               format_errors: tuple[type[BaseException], ...], parse: Callable[[StorageFile], T],
               members: Callable[[T], Iterator[Member]]) -> Iterator[Member]:
    """The members of a one-file shard (tar, Parquet): the preamble its readers share.

    Opens the file (a storage failure raises :class:`ShardReadError`), parses its header with
    ``parse``; when that raises one of ``format_errors`` the shard is one ``UnreadableShard``
    dead letter (``what`` names the format in it), else ``members(parsed)`` yields the rest.
    """
    with StorageFile.open(spec.urls[0], storage_options) as f:
        try:
            parsed = parse(f)
        except format_errors as exc:
            tally.members += 1
            yield unreadable(spec, what, exc)
            return
        yield from members(parsed)


def unreadable(spec: ShardSpec, what: str, exc: BaseException) -> Member:
    log.warning("unreadable shard %s: %s", printable(spec.name), reason(exc))
    return dead_letter("__shard__", 0, "UnreadableShard", f"{spec.name}: not a readable {what} ({reason(exc)})")
