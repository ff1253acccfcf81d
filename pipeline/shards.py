"""Image shards: the one reader shared by training and the Beam pipeline, and the writer.

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
"""
from __future__ import annotations

import io
import itertools
import json
import logging
import lzma
import re
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from vae_model.errors import NoShardsError, ShardError, StorageError
from vae_model.storage import (StorageOptions, atomic_write_bytes, describe_storage_error, get_fs, is_local, join,
                               unstrip)

from .decode import SUPPORTED_EXTS
from .idx import is_idx_url, labels_url_for, read_idx

log = logging.getLogger(__name__)

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_BATCH_ROWS = 256
IMAGE_COLUMNS = ("image", "img", "png", "jpg", "bytes", "data")
KEY_COLUMNS = ("key", "__key__", "id")
LABEL_COLUMNS = ("label", "cls", "class")
META_COLUMNS = ("json", "meta")
# Tar sidecars without an image are reported as NoImageMember; any other suffix as NotAnImage.
_TEXT_SUFFIXES = frozenset({"cls", "json", "txt", "text", "caption", "cap", "md"})
_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)
_PARQUET_ERRORS = (pa.ArrowException, OSError, ValueError, EOFError)
_SHARD_NAME = re.compile(r"shard-\d{6}\.(tar|parquet)$")
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpg"), (b"BM", "bmp"))


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


class ShardReadError(StorageError):
    """Storage could not deliver a shard's bytes (after the storage layer's own retries).

    Not a dead letter: the data may be fine, so the shard fails, the run fails with this one
    line, and a rerun reads the shard again. Not an ``OSError`` either, so the handlers that turn
    bad bytes into dead letters (``_TAR_ERRORS``, ``_PARQUET_ERRORS``) let it through.
    """


def _read_failure(url: str, exc: BaseException) -> ShardReadError:
    return ShardReadError(f"{describe_storage_error(url, exc)} (storage failure while reading a shard: "
                          "nothing of it was committed; rerun once storage is back)")


class _StorageFile(io.RawIOBase):
    """A shard file as fsspec opened it, whose reads re-raise any storage failure as :class:`ShardReadError`.

    The format parsers above it (``tarfile``, gzip, pyarrow) judge the bytes; everything this
    layer raises is about fetching them, whatever type the backend uses for it (s3fs's
    ``OSError`` for SlowDown, a timeout, ``FileNotFoundError``, ``EIO``).
    """

    def __init__(self, f: Any, url: str) -> None:
        super().__init__()
        self._f, self.url = f, url

    @classmethod
    def open(cls, fs: fsspec.AbstractFileSystem, path: str, url: str) -> _StorageFile:
        try:
            return cls(fs.open(path, "rb"), url)
        except Exception as exc:  # storage backends raise many types
            raise _read_failure(url, exc) from exc

    def _call(self, method: Callable, *args: Any) -> Any:
        try:
            return method(*args)
        except Exception as exc:  # storage backends raise many types
            raise _read_failure(self.url, exc) from exc

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


# --------------------------------------------------------------------------- listing


def _suffix_kind(path: str) -> str | None:
    low = path.lower()
    if low.endswith(TAR_SUFFIXES):
        return "tar"
    if low.endswith(".parquet"):
        return "parquet"
    if "." in low.rsplit("/", 1)[-1] and low.rsplit(".", 1)[-1] in SUPPORTED_EXTS:
        return "images"
    return None


def _rel(path: str, root: str) -> str:
    return path[len(root) + 1:] if root and path.startswith(root + "/") else path.rsplit("/", 1)[-1]


def _list_files(url: str, storage_options: StorageOptions) -> tuple[fsspec.AbstractFileSystem, str, list[str]]:
    """Files matched by a file URL, a glob or a folder: ``(fs, root folder path, sorted file paths)``."""
    fs, path = get_fs(url, storage_options)
    try:
        magic = re.search(r"[*?\[]", path)
        if magic:
            root = path[:magic.start()].rsplit("/", 1)[0]
            found = fs.glob(path, detail=True)
        elif fs.isdir(path):
            root = path.rstrip("/")
            found = fs.find(root, detail=True)
        elif fs.isfile(path):
            root, found = path.rsplit("/", 1)[0] if "/" in path else "", {path: {"type": "file"}}
        else:
            root, found = path, {}
        bucket = path.split("/", 1)[0]
        # Object stores list a missing bucket as empty; say so rather than "no shards".
        bucket_missing = not found and not is_local(fs) and "memory" not in fs.protocol and not fs.exists(bucket)
    except StorageError:
        raise
    except Exception as exc:  # storage backends raise many types; report one line
        raise StorageError(describe_storage_error(url, exc)) from None
    if bucket_missing:
        raise StorageError(f"{url}: the bucket does not exist")
    files = sorted(p for p, info in found.items()
                   if info.get("type") == "file" and not any(part.startswith(".") for part in _rel(p, root).split("/")))
    return fs, root, files


def expand_shards(url: str, storage_options: StorageOptions = None, images_per_group: int = 1000) -> list[ShardSpec]:
    """List the shards behind a file URL, a glob (``s3://b/x/*.tar``, ``/d/**/*.parquet``) or a folder.

    Folders are searched recursively. Tar and Parquet files come first, sorted by URL; image
    files follow in sorted groups of ``images_per_group``, named ``{folder}/images-{i:05d}``
    where ``folder`` is the given folder (for a glob, its fixed leading folder).

    Raises:
        NoShardsError: Nothing matched.
        StorageError: The URL cannot be listed (missing bucket, bad credentials, ...).
    """
    if images_per_group < 1:
        raise ShardError(f"images_per_group must be at least 1, got {images_per_group}")
    fs, root, files = _list_files(url, storage_options)
    specs: list[ShardSpec] = []
    images: list[str] = []
    others: list[str] = []
    for path in files:
        kind = _suffix_kind(path)
        if kind == "images":
            images.append(path)
        elif kind is not None:
            full = unstrip(fs, path)
            specs.append(ShardSpec(full, kind, (full,)))
        else:
            others.append(path)
    root_url = unstrip(fs, root) if root else root
    for i, start in enumerate(range(0, len(images), images_per_group)):
        group = tuple(unstrip(fs, p) for p in images[start:start + images_per_group])
        specs.append(ShardSpec(f"{root_url}/images-{i:05d}", "images", group))
    if not specs:
        hint = f"; ignored {len(others)} other file(s) such as {unstrip(fs, others[0])}" if others else ""
        raise NoShardsError(f"no shards matched URL: {url} (expected .tar, .parquet or image files){hint}")
    log.info("%s: %s shard(s)", url, len(specs))
    return specs


# --------------------------------------------------------------------------- keys

_ESCAPE = re.compile("[%\ud800-\udfff]")
_UNESCAPE = re.compile("%([0-9A-Fa-f]{2})")


def _escape_char(match: re.Match) -> str:
    ch = match.group()
    if ch == "%":
        return "%25"
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the undecodable byte code - 0xDC00
        return f"%{code - 0xDC00:02X}"
    return "".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))


def escape_key(text: str) -> str:
    """Text from the outside (member names, file names, shard URLs) as a valid UTF-8 key.

    Python hands over file names that are not valid UTF-8 (GNU tar of a Latin-1 name, an
    ``os.listdir`` entry) as *surrogate-escaped* ``str`` (byte ``0xE9`` -> ``"\\udce9"``), which
    Parquet cannot store. Each such byte becomes ``%XX`` (upper-case hex) and ``%`` itself
    becomes ``%25``; everything else is unchanged, so ordinary keys stay as they were.
    :func:`unescape_key` restores the original exactly (``os.fsencode`` of it gives the
    original bytes).
    """
    return _ESCAPE.sub(_escape_char, text)


def unescape_key(key: str) -> str:
    """Undo :func:`escape_key`: ``%25`` -> ``%``, ``%XX`` (XX >= 80) -> the surrogate escape."""
    def char(match: re.Match) -> str:
        b = int(match.group(1), 16)
        return chr(b) if b < 0x80 else chr(0xDC00 + b)

    return _UNESCAPE.sub(char, key)


def printable(text: str) -> str:
    """``text`` with surrogate escapes written as ``\\udcXX``: safe for messages and logs."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class ReadLimits:
    """Per-member size caps, checked before a member's bytes are read (tar header, file size,
    Parquet cell length). A member over a cap is a ``MemberTooLarge`` dead letter."""

    max_member_bytes: int  # encoded image bytes (--max-member-bytes)
    max_sidecar_bytes: int  # one .cls / .json sidecar or metadata cell (--max-sidecar-bytes)

    @classmethod
    def default(cls) -> ReadLimits:
        from pipeline.options import DEFAULT_MAX_MEMBER_BYTES, DEFAULT_MAX_SIDECAR_BYTES  # options imports us

        return cls(DEFAULT_MAX_MEMBER_BYTES, DEFAULT_MAX_SIDECAR_BYTES)


@dataclass
class ShardTally:
    """What a shard contains, counted by the reader from the shard itself, apart from what it yields.

    ``members``: key groups in the tar headers (a group ends when the key changes or a suffix
    repeats), rows in the Parquet footer, files listed for an image group. A shard that cannot be
    read at all, or whose damaged tail starts outside any member, counts one more member: the
    dead letter that reports it. The embedder compares it with rows + dead letters.
    """

    members: int = 0


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
    limits = limits or ReadLimits.default()
    tally = tally if tally is not None else ShardTally()
    if spec.format == "tar":
        return _iter_tar(spec, storage_options, limits, tally)
    if spec.format == "parquet":
        return _iter_parquet(spec, storage_options, limits, tally)
    if spec.format == "images":
        return _iter_images(spec, storage_options, limits, tally)
    raise ShardError(f"unknown shard format {spec.format!r} for {spec.name}: expected tar, parquet or images")


def _error(key: str, index: int, error_type: str, message: str, ext: str = "") -> Member:
    return Member(key=key, index=index, data=None, ext=ext, label=None, meta=None, error=printable(message),
                  error_type=error_type)


def _reason(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _unreadable(spec: ShardSpec, what: str, exc: BaseException) -> Member:
    log.warning("unreadable shard %s: %s", printable(spec.name), _reason(exc))
    return _error("__shard__", 0, "UnreadableShard", f"{spec.name}: not a readable {what} ({_reason(exc)})")


def _truncated(spec: ShardSpec, kind: str, n: int, reason: str) -> Member:
    log.warning("shard %s is truncated or corrupt after %s members: %s", printable(spec.name), n, reason)
    return _error("__truncated__", n, "TruncatedShard", f"truncated or corrupt {kind} after {n} members: {reason}")


def _too_large(what: str, size: int, cap: int, flag: str) -> _Problem:
    return _Problem("MemberTooLarge", f"{what} is {size} bytes, over the {cap}-byte limit; raise {flag} to read it")


@dataclass(frozen=True)
class _Problem:
    """A tar file that stands in a key group but cannot be used: why, as a dead letter."""

    error_type: str
    message: str


class _EndTrackingTarInfo(tarfile.TarInfo):
    """Records why ``tarfile`` stopped reading headers.

    Past the first member, ``tarfile`` treats a missing, partial or garbled header as a normal
    end of archive; only the all-zero end-of-archive block (``EOFHeaderError``) is a real end.
    """

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.HeaderError as exc:
            tarfile_.vaepipe_end = exc  # type: ignore[attr-defined]
            raise


class _Reread:
    """Reads an earlier member again through a second, seekable handle (for hard links).

    The stream cannot seek back; ``offset_data`` is a position in the uncompressed tar, which
    ``tarfile.open(mode="r:*")`` gives for every compression (gzip/bz2/xz seek by decompressing).
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, url: str) -> None:
        self.fs, self.path, self.url = fs, path, url
        self.f: Any = None
        self.tf: tarfile.TarFile | None = None

    def read(self, offset: int, size: int) -> bytes:
        if self.tf is None:
            self.f = _StorageFile.open(self.fs, self.path, self.url)
            self.tf = tarfile.open(fileobj=self.f, mode="r:*")
        fileobj = self.tf.fileobj
        assert fileobj is not None
        fileobj.seek(offset)
        data = fileobj.read(size)
        if len(data) != size:
            raise EOFError(f"link target ends after {len(data)} of {size} bytes")
        return data

    def close(self) -> None:
        for handle in (self.tf, self.f):
            if handle is not None:
                handle.close()


def _iter_tar(spec: ShardSpec, storage_options: StorageOptions, limits: ReadLimits,
              tally: ShardTally) -> Iterator[Member]:
    url = spec.urls[0]
    fs, path = get_fs(url, storage_options)
    f = _StorageFile.open(fs, path, url)
    reread = _Reread(fs, path, url)
    with f:
        try:
            tf = tarfile.open(fileobj=f, mode="r|*", tarinfo=_EndTrackingTarInfo)
        except _TAR_ERRORS as exc:
            tally.members += 1
            yield _unreadable(spec, "tar archive", exc)
            return
        try:
            yield from _tar_members(spec, tf, limits, tally, reread)
        finally:
            reread.close()


def _tar_name(name: str) -> str:
    name = name.lstrip("/")
    while name.startswith("./"):
        name = name[2:]
    return name


_SIDECARS = ("cls", "json")


def _tar_members(spec: ShardSpec, tf: tarfile.TarFile, limits: ReadLimits, tally: ShardTally,
                 reread: _Reread) -> Iterator[Member]:
    builder = _MemberBuilder()
    key: str | None = None
    files: dict[str, bytes | _Problem | None] = {}
    regular: dict[str, tuple[int, int]] = {}  # name -> (offset_data, size): hard-link targets
    try:
        for info in tf:
            tf.members = []  # stream mode otherwise keeps every TarInfo for the whole shard
            name = _tar_name(info.name)
            if info.isfile():
                regular[name] = (info.offset_data, info.size)
            if info.isdir():
                continue
            folder, _, base = name.rpartition("/")
            if not base or base.startswith("."):
                continue
            stem, _, suffix = base.partition(".")
            suffix = suffix.lower()
            member_key = f"{folder}/{stem}" if folder else stem
            # A repeated suffix starts a new member with the same key (a.png, a.png): a duplicate.
            if member_key != key or suffix in files:
                if key is not None:
                    yield builder.tar_member(key, files)
                key, files = member_key, {}
                tally.members += 1
            if suffix in SUPPORTED_EXTS or suffix in _SIDECARS:
                files[suffix] = _tar_file(tf, info, name, suffix, limits, regular, reread)
            else:
                files[suffix] = None
        end = getattr(tf, "vaepipe_end", None)
        if end is not None and not isinstance(end, tarfile.EOFHeaderError):
            raise tarfile.ReadError(f"no end-of-archive marker ({end})")
    except _TAR_ERRORS as exc:
        if key is None:
            tally.members += 1  # the damage stands alone; otherwise it stands for the incomplete member
        reason = _reason(exc) + (f"; incomplete member {printable(key)!r} skipped" if key is not None else "")
        yield _truncated(spec, "tar", builder.index, reason)
        return
    if key is not None:
        yield builder.tar_member(key, files)


def _tar_file(tf: tarfile.TarFile, info: tarfile.TarInfo, name: str, suffix: str, limits: ReadLimits,
              regular: dict[str, tuple[int, int]], reread: _Reread) -> bytes | _Problem:
    """The bytes of one image or sidecar file in a tar, or the problem that stops us using it."""
    sidecar = suffix in _SIDECARS
    cap = limits.max_sidecar_bytes if sidecar else limits.max_member_bytes
    flag = "--max-sidecar-bytes" if sidecar else "--max-member-bytes"
    if info.isfile():
        if info.size > cap:
            return _too_large(name, info.size, cap, flag)
        extracted = tf.extractfile(info)
        assert extracted is not None
        return extracted.read()
    if info.islnk():
        target = _tar_name(info.linkname)
        if target not in regular:
            return _Problem("UnresolvedLink", f"{name} is a hard link to {info.linkname!r}, "
                                              "which is not an earlier regular file in this tar")
        offset, size = regular[target]
        if size > cap:
            return _too_large(f"{name} (hard link to {target})", size, cap, flag)
        try:
            return reread.read(offset, size)
        except ShardReadError:
            raise
        except Exception as exc:  # decompressors raise many types
            return _Problem("UnresolvedLink", f"{name}: cannot re-read its hard-link target {target} "
                                              f"({_reason(exc)})")
    kind = ("symbolic link" if info.issym() else "FIFO" if info.isfifo() else "character device" if info.ischr()
            else "block device" if info.isblk() else f"tar entry of type {info.type!r}")
    what = f" to {info.linkname!r}" if info.issym() else ""
    return _Problem("NotARegularFile", f"{name} is a {kind}{what}, not a regular file; store the file itself")


class _MemberBuilder:
    """Numbers members, keeps keys unique (and escaped) and parses labels and metadata for one shard."""

    def __init__(self) -> None:
        self.index = 0
        self.seen: set[str] = set()

    def has(self, key: str) -> bool:
        return escape_key(key) in self.seen

    def _next(self, key: str) -> tuple[str, int, Member | None]:
        key = escape_key(key)
        index = self.index
        self.index += 1
        if key in self.seen:
            return f"{key}#{index}", index, _error(f"{key}#{index}", index, "DuplicateKey",
                                                    f"duplicate key {key!r} in shard")
        self.seen.add(key)
        return key, index, None

    def tar_member(self, key: str, files: dict[str, bytes | _Problem | None]) -> Member:
        key, index, dup = self._next(key)
        if dup is not None:
            return dup
        exts = [s for s in files if s in SUPPORTED_EXTS]
        if not exts:
            found = ", ".join(f".{s}" if s else "(no extension)" for s in files)
            if all(s in _TEXT_SUFFIXES for s in files):
                return _error(key, index, "NoImageMember", f"no image member (found: {found})")
            hint = ""
            if any(s.rsplit(".", 1)[-1] in SUPPORTED_EXTS for s in files):
                hint = " (the key ends at the first dot of the file name, as in WebDataset)"
            return _error(key, index, "NotAnImage",
                          f"not an image: {key} has {found}; expected one of .{', .'.join(SUPPORTED_EXTS)}{hint}")
        for suffix in (exts[0], *_SIDECARS):
            problem = files.get(suffix)
            if isinstance(problem, _Problem):
                return _error(key, index, problem.error_type, problem.message, exts[0])
        return self._finish(key, index, files[exts[0]], exts[0], files.get("cls"), files.get("json"))

    def row_member(self, key: str, data: Any, ext: str, label: Any, meta: Any,
                   problem: _Problem | None = None) -> Member:
        key, index, dup = self._next(key)
        if dup is not None:
            return dup
        if problem is not None:
            return _error(key, index, problem.error_type, problem.message, ext)
        if data is None:
            return _error(key, index, "NullImage", "image column is null in this row")
        return self._finish(key, index, bytes(data), ext or _sniff_ext(data), label, meta)

    def image_member(self, key: str, data: bytes | None, ext: str, error: _Problem | None) -> Member:
        key, index, dup = self._next(key)
        if dup is not None:
            return dup
        if error is not None:
            return _error(key, index, error.error_type, error.message, ext)
        return Member(key, index, data, ext, None, None)

    @staticmethod
    def _finish(key: str, index: int, data: Any, ext: str, label: Any, meta: Any) -> Member:
        try:
            parsed_label = _parse_label(label)
        except (ValueError, TypeError, UnicodeDecodeError, OverflowError) as exc:
            why = "is out of the int64 range" if isinstance(exc, OverflowError) else "is not an integer"
            return _error(key, index, "BadLabel", f"label {label!r:.40} {why}", ext)
        try:
            parsed_meta = _parse_meta(meta)
        except (ValueError, TypeError, UnicodeDecodeError, RecursionError) as exc:
            return _error(key, index, "BadMeta", f"metadata is not a strict JSON object ({exc})", ext)
        return Member(key, index, data, ext, parsed_label, parsed_meta)


_INT64 = range(-(2 ** 63), 2 ** 63)


def _parse_label(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, (bytes, str)):
        text = value.decode("utf-8") if isinstance(value, bytes) else value
        value = int(text.strip())
    elif isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    label = int(value)
    if label not in _INT64:  # the label column is int64
        raise OverflowError(label)
    return label


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_meta(value: Any) -> dict | None:
    if value is None:
        return None
    if isinstance(value, (bytes, str)):
        value = json.loads(value, parse_constant=_no_constant)  # NaN, Infinity: rejected, as strict JSON does
    if not isinstance(value, dict):
        raise ValueError(f"got {type(value).__name__}")
    json.dumps(value, allow_nan=False)  # a struct column may hold NaN floats: the meta column must stay JSON
    return value


def _sniff_ext(data: bytes) -> str:
    head = bytes(data[:12])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return next((ext for magic, ext in _MAGIC if head.startswith(magic)), "")


@dataclass(frozen=True)
class _ParquetColumns:
    image: str | None
    image_struct: bool
    key: str | None
    label: str | None
    meta: str | None

    @property
    def names(self) -> list[str]:
        return [c for c in (self.image, self.key, self.label, self.meta) if c is not None]


def _is_binary(t: pa.DataType) -> bool:
    is_view = getattr(pa.types, "is_binary_view", None)  # pyarrow >= 16
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or bool(is_view and is_view(t))


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or _is_binary(t)


def _parquet_columns(schema: pa.Schema) -> _ParquetColumns:
    image, struct = None, False
    for name in IMAGE_COLUMNS:
        if name not in schema.names:
            continue
        t = schema.field(name).type
        if _is_binary(t):
            image = name
            break
        if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 and _is_binary(t.field("bytes").type):
            image, struct = name, True
            break

    def first(names: tuple[str, ...]) -> str | None:
        return next((n for n in names if n in schema.names), None)

    return _ParquetColumns(image, struct, first(KEY_COLUMNS), first(LABEL_COLUMNS), first(META_COLUMNS))


def _capped(column: pa.Array, cap: int) -> tuple[list, list[int | None]]:
    """A binary/string column as Python values, with cells over ``cap`` bytes nulled, and each cell's length."""
    lengths = pc.binary_length(column)
    over = pc.fill_null(pc.greater(lengths, cap), False)
    if pc.any(over).as_py():
        column = pc.if_else(over, pa.scalar(None, column.type), column)
    return column.to_pylist(), lengths.to_pylist()


def _parquet_batch_rows(pf: pq.ParquetFile, limits: ReadLimits) -> int:
    """Rows per batch: at most 256, fewer when rows are big, so a batch stays near one member's cap."""
    md = pf.metadata
    biggest = max((md.row_group(i).total_byte_size / max(1, md.row_group(i).num_rows)
                   for i in range(md.num_row_groups)), default=0)
    return max(1, min(PARQUET_BATCH_ROWS, int(limits.max_member_bytes // max(1.0, biggest))))


def _iter_parquet(spec: ShardSpec, storage_options: StorageOptions, limits: ReadLimits,
                  tally: ShardTally) -> Iterator[Member]:
    url = spec.urls[0]
    fs, path = get_fs(url, storage_options)
    with _StorageFile.open(fs, path, url) as f:
        try:
            pf = pq.ParquetFile(f, buffer_size=1 << 20)  # buffered: a column chunk is not read whole
            cols = _parquet_columns(pf.schema_arrow)
        except _PARQUET_ERRORS as exc:
            tally.members += 1
            yield _unreadable(spec, "Parquet file", exc)
            return
        if cols.image is None:
            tally.members += 1
            yield _error("__shard__", 0, "NoImageColumn",
                         f"{spec.name}: no image column; expected one of {', '.join(IMAGE_COLUMNS)} of binary type "
                         f"(or a struct with a 'bytes' field), found {', '.join(pf.schema_arrow.names) or 'none'}")
            return
        tally.members += pf.metadata.num_rows
        builder = _MemberBuilder()
        batch_rows = _parquet_batch_rows(pf, limits)
        row = 0
        for group in range(pf.metadata.num_row_groups):
            end = row + pf.metadata.row_group(group).num_rows
            try:
                for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[group], columns=cols.names):
                    members = _parquet_rows(batch, cols, limits, row)
                    for member in members:
                        row += 1
                        yield builder.row_member(*member)
            except _PARQUET_ERRORS as exc:
                # The footer says how many rows this group holds: each unread one is a dead letter.
                reason = f"row group {group} of {spec.name} is corrupt ({_reason(exc)})"
                log.warning("%s: %d rows lost", printable(reason), end - row)
                for lost in range(row, end):
                    yield builder.row_member(f"{lost:08d}", None, "", None, None,
                                             _Problem("CorruptRowGroup", reason))
            row = end


def _parquet_rows(batch: pa.RecordBatch, cols: _ParquetColumns, limits: ReadLimits,
                  first_row: int) -> list[tuple]:
    """``(key, data, ext, label, meta, problem)`` for each row of one batch, oversized cells left unread."""
    n = batch.num_rows
    image = batch.column(cols.image)
    paths: list = [None] * n
    if cols.image_struct:
        if image.type.get_field_index("path") >= 0:
            paths = pc.struct_field(image, "path").to_pylist()
        image = pc.struct_field(image, "bytes")
    data, sizes = _capped(image, limits.max_member_bytes)
    keys = batch.column(cols.key).to_pylist() if cols.key else [None] * n
    labels = batch.column(cols.label).to_pylist() if cols.label else [None] * n
    metas, meta_sizes = [None] * n, [None] * n
    if cols.meta:
        meta = batch.column(cols.meta)
        if _is_text(meta.type):
            metas, meta_sizes = _capped(meta, limits.max_sidecar_bytes)
        else:
            metas = meta.to_pylist()
    out = []
    for i in range(n):
        key = str(keys[i]) if keys[i] is not None else f"{first_row + i:08d}"
        problem = None
        if (sizes[i] or 0) > limits.max_member_bytes:
            problem = _too_large(f"image cell of row {first_row + i}", sizes[i], limits.max_member_bytes,
                                 "--max-member-bytes")
        elif (meta_sizes[i] or 0) > limits.max_sidecar_bytes:
            problem = _too_large(f"metadata cell of row {first_row + i}", meta_sizes[i], limits.max_sidecar_bytes,
                                 "--max-sidecar-bytes")
        out.append((key, data[i], _path_ext(paths[i]) if data[i] is not None else "", labels[i], metas[i], problem))
    return out


def _path_ext(path: str | None) -> str:
    if not path or "." not in path.rsplit("/", 1)[-1]:
        return ""
    ext = path.rsplit(".", 1)[-1].lower()
    return ext if ext in SUPPORTED_EXTS else ""


def _iter_images(spec: ShardSpec, storage_options: StorageOptions, limits: ReadLimits,
                 tally: ShardTally) -> Iterator[Member]:
    folder = spec.name.rsplit("/", 1)[0]
    builder = _MemberBuilder()
    tally.members += len(spec.urls)
    cap = limits.max_member_bytes
    for url in spec.urls:
        rel = _rel(url, folder)
        stem, _, ext = rel.rpartition(".")
        key = stem or rel
        if builder.has(key):  # a.png and a.jpg side by side: keep both, the later one by full name
            key = rel
        fs, path = get_fs(url, storage_options)
        error: _Problem | None = None
        try:
            # One ranged read: never more than the cap (+1 byte to tell "over") in memory.
            data: bytes | None = fs.cat_file(path, start=0, end=cap + 1)
        except Exception as exc:  # storage backends raise many types
            raise _read_failure(url, exc) from exc
        if data is not None and len(data) > cap:
            size = _file_size(fs, path)
            data, error = None, _too_large(rel, size if size is not None else len(data), cap, "--max-member-bytes")
        yield builder.image_member(key, data, ext.lower(), error)


def _file_size(fs: fsspec.AbstractFileSystem, path: str) -> int | None:
    try:
        return fs.size(path)
    except Exception:  # only for the message
        return None


# --------------------------------------------------------------------------- writing

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
    fs, root, files = _list_files(source, storage_options)
    paths = [p for p in files if _suffix_kind(p) == "images"][:limit]
    if not paths:
        raise NoShardsError(f"no image files matched {source} (expected an IDX *-images-idx3-ubyte[.gz] file "
                            f"or a folder or glob of .{', .'.join(SUPPORTED_EXTS)} files)")

    def records() -> Iterator[_Record]:
        used: set[str] = set()
        for path in paths:
            stem, _, ext = _rel(path, root).rpartition(".")
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
