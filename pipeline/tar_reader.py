"""Reading tar shards (``.tar``, ``.tar.gz``, ``.tgz``, WebDataset convention) as a stream.

Files are grouped by key (the member path up to the first dot of its file name); a group ends
where the key changes or a suffix repeats. Hard links are read again from their earlier target
through a second, seekable handle; symbolic links, FIFOs and devices named like images or
sidecars are ``NotARegularFile``. A damaged tail is one ``TruncatedShard`` dead letter after the
members read before it.
"""
from __future__ import annotations

import logging
import lzma
import tarfile
import zlib
from collections.abc import Iterator
from typing import Any

from vae_model.storage import StorageOptions

from .decode import SUPPORTED_EXTS
from .members import SIDECARS, MemberBuilder, Problem, ReadLimits, ShardTally, dead_letter, printable, reason, too_large
from .shard_file import ShardReadError, StorageFile, read_shard
from .shards import Member, ShardSpec

log = logging.getLogger(__name__)

TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)


# Header fields as tarfile.TarInfo.frombuf reads them: numbers (mode, uid, gid, size, mtime,
# devmajor, chksum, devminor; this order, for the unpacking below) and NUL-terminated texts (name,
# linkname, uname, gname, the ustar prefix).
_NUMBERS = ((100, 108), (108, 116), (116, 124), (124, 136), (136, 148), (329, 337), (148, 156), (337, 345))
_TEXTS = ((0, 100), (157, 257), (265, 297), (297, 329), (345, 500))


def _text(field: bytes, encoding: str, errors: str) -> str:
    return field.split(b"\0", 1)[0].decode(encoding, errors)


def _octal(field: bytes) -> int:
    """An octal number field (tarfile's ``nti``); ValueError for base-256 and anything else."""
    if field[0] >= 0o200:
        raise ValueError("base-256 number")
    return int(field.split(b"\0", 1)[0].decode("ascii").strip() or "0", 8)


class _EndTrackingTarInfo(tarfile.TarInfo):
    """Records why ``tarfile`` stopped reading headers.

    Past the first member, ``tarfile`` treats a missing, partial or garbled header as a normal
    end of archive; only the all-zero end-of-archive block (``EOFHeaderError``) is a real end.
    """

    @classmethod
    def frombuf(cls, buf: bytes, encoding: str, errors: str) -> tarfile.TarInfo:
        """``TarInfo.frombuf`` for the common header, a regular file (type ``0``) with octal
        numbers and an unsigned checksum, in fewer steps (header parsing was two fifths of a
        tar's read cost per image); every other header, and any doubt, goes to ``tarfile``'s own."""
        if len(buf) == tarfile.BLOCKSIZE and buf[156:157] == tarfile.REGTYPE:
            try:
                nums = [_octal(buf[a:b]) for a, b in _NUMBERS]
            except ValueError:
                nums = None
            if nums is not None and nums[6] == 256 + sum(buf) - sum(buf[148:156]):
                obj = cls()
                obj.name, obj.linkname, obj.uname, obj.gname, prefix = (
                    _text(buf[a:b], encoding, errors) for a, b in _TEXTS)
                obj.mode, obj.uid, obj.gid, obj.size, obj.mtime, obj.devmajor, obj.chksum, obj.devminor = nums
                obj.type = tarfile.REGTYPE
                if prefix:
                    obj.name = prefix + "/" + obj.name
                return obj
        return super().frombuf(buf, encoding, errors)

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

    def __init__(self, url: str, storage_options: StorageOptions) -> None:
        self.url, self.storage_options = url, storage_options
        self.f: Any = None
        self.tf: tarfile.TarFile | None = None

    def read(self, offset: int, size: int) -> bytes:
        if self.tf is None:
            self.f = StorageFile.open(self.url, self.storage_options)
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


def iter_tar(spec: ShardSpec, storage_options: StorageOptions, limits: ReadLimits,
             tally: ShardTally) -> Iterator[Member]:
    def parse(f: StorageFile) -> tarfile.TarFile:
        return tarfile.open(fileobj=f, mode="r|*", tarinfo=_EndTrackingTarInfo)

    def members(tf: tarfile.TarFile) -> Iterator[Member]:
        reread = _Reread(spec.urls[0], storage_options)
        try:
            yield from _tar_members(spec, tf, limits, tally, reread)
        finally:
            reread.close()

    return read_shard(spec, storage_options, tally, "tar archive", TAR_ERRORS, parse, members)


def _tar_name(name: str) -> str:
    name = name.lstrip("/")
    while name.startswith("./"):
        name = name[2:]
    return name


def _tar_members(spec: ShardSpec, tf: tarfile.TarFile, limits: ReadLimits, tally: ShardTally,
                 reread: _Reread) -> Iterator[Member]:
    builder = MemberBuilder()
    key: str | None = None
    files: dict[str, bytes | Problem | None] = {}
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
            if suffix in SUPPORTED_EXTS or suffix in SIDECARS:
                files[suffix] = _tar_file(tf, info, name, suffix, limits, regular, reread)
            else:
                files[suffix] = None
        end = getattr(tf, "vaepipe_end", None)
        if end is not None and not isinstance(end, tarfile.EOFHeaderError):
            raise tarfile.ReadError(f"no end-of-archive marker ({end})")
    except TAR_ERRORS as exc:
        if key is None:
            tally.members += 1  # the damage stands alone; otherwise it stands for the incomplete member
        why = reason(exc) + (f"; incomplete member {printable(key)!r} skipped" if key is not None else "")
        yield _truncated(spec, builder.index, why)
        return
    if key is not None:
        yield builder.tar_member(key, files)


def _truncated(spec: ShardSpec, n: int, why: str) -> Member:
    log.warning("shard %s is truncated or corrupt after %s members: %s", printable(spec.name), n, why)
    return dead_letter("__truncated__", n, "TruncatedShard", f"truncated or corrupt tar after {n} members: {why}")


def _tar_file(tf: tarfile.TarFile, info: tarfile.TarInfo, name: str, suffix: str, limits: ReadLimits,
              regular: dict[str, tuple[int, int]], reread: _Reread) -> bytes | Problem:
    """The bytes of one image or sidecar file in a tar, or the problem that stops us using it."""
    sidecar = suffix in SIDECARS
    cap = limits.max_sidecar_bytes if sidecar else limits.max_member_bytes
    flag = "--max-sidecar-bytes" if sidecar else "--max-member-bytes"
    if info.isfile():
        if info.size > cap:
            return too_large(name, info.size, cap, flag)
        if info.sparse is None and tf.fileobj is not None:
            # The stream stands at this member's data (``next()`` leaves it at ``offset_data``):
            # read it straight, without extractfile's two wrapper objects (a fifth of a tar's
            # read cost per image; BENCHMARKS.md, "Embedding only").
            data = tf.fileobj.read(info.size)
            if len(data) != info.size:
                raise tarfile.ReadError("unexpected end of data")
            return data
        extracted = tf.extractfile(info)
        assert extracted is not None
        return extracted.read()
    if info.islnk():
        return _hard_link(info, name, cap, flag, regular, reread)
    kind = ("symbolic link" if info.issym() else "FIFO" if info.isfifo() else "character device" if info.ischr()
            else "block device" if info.isblk() else f"tar entry of type {info.type!r}")
    what = f" to {info.linkname!r}" if info.issym() else ""
    return Problem("NotARegularFile", f"{name} is a {kind}{what}, not a regular file; store the file itself")


def _hard_link(info: tarfile.TarInfo, name: str, cap: int, flag: str, regular: dict[str, tuple[int, int]],
               reread: _Reread) -> bytes | Problem:
    """A hard link's data: its target's, read again (it must be an earlier regular file of this tar)."""
    target = _tar_name(info.linkname)
    if target not in regular:
        return Problem("UnresolvedLink", f"{name} is a hard link to {info.linkname!r}, "
                                         "which is not an earlier regular file in this tar")
    offset, size = regular[target]
    if size > cap:
        return too_large(f"{name} (hard link to {target})", size, cap, flag)
    try:
        return reread.read(offset, size)
    except ShardReadError:
        raise
    except Exception as exc:  # decompressors raise many types
        return Problem("UnresolvedLink", f"{name}: cannot re-read its hard-link target {target} ({reason(exc)})")
