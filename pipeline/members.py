"""Building members: keys, labels, metadata and dead letters, the same for every shard format.

The readers (:mod:`pipeline.tar_reader`, :mod:`pipeline.parquet_reader`,
:mod:`pipeline.folder_reader`) hand over what they found; a :class:`MemberBuilder` numbers the
members of one shard, keeps their keys unique and escaped, and parses labels (int64) and metadata
(strict JSON objects), turning each problem into a dead-letter :class:`~pipeline.shards.Member`.
:class:`ReadLimits` are the size caps the readers check before reading bytes; a
:class:`ShardTally` counts what a shard contains apart from what is yielded.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from .decode import HEIF_BRANDS, SUPPORTED_EXTS
from .shards import Member

SIDECARS = ("cls", "json")
# Tar sidecars without an image are reported as NoImageMember; any other suffix as NotAnImage.
_TEXT_SUFFIXES = frozenset({"cls", "json", "txt", "text", "caption", "cap", "md"})
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpg"), (b"BM", "bmp"), (b"GIF87a", "gif"),
          (b"GIF89a", "gif"), (b"II*\x00", "tif"), (b"MM\x00*", "tif"), (b"\x00\x00\x00\x0cjP  ", "jp2"),
          (b"\xffO\xffQ", "j2k"))
_INT64 = range(-(2 ** 63), 2 ** 63)


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


@dataclass(frozen=True)
class Problem:
    """A file that stands in a member but cannot be used: why, as a dead letter."""

    error_type: str
    message: str


def dead_letter(key: str, index: int, error_type: str, message: str, ext: str = "") -> Member:
    return Member(key=key, index=index, data=None, ext=ext, label=None, meta=None, error=printable(message),
                  error_type=error_type)


def reason(exc: BaseException) -> str:
    """``Type: message`` of an exception, on one line."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def too_large(what: str, size: int, cap: int, flag: str) -> Problem:
    return Problem("MemberTooLarge", f"{what} is {size} bytes, over the {cap}-byte limit; raise {flag} to read it")


class MemberBuilder:
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
            return f"{key}#{index}", index, dead_letter(f"{key}#{index}", index, "DuplicateKey",
                                                        f"duplicate key {key!r} in shard")
        self.seen.add(key)
        return key, index, None

    def tar_member(self, key: str, files: dict[str, bytes | Problem | None]) -> Member:
        """A tar key group: ``files`` maps each suffix to its bytes, its problem, or ``None`` (not read)."""
        key, index, dup = self._next(key)
        if dup is not None:
            return dup
        exts = [s for s in files if s in SUPPORTED_EXTS]
        if not exts:
            return _no_image(key, index, files)
        for suffix in (exts[0], *SIDECARS):
            problem = files.get(suffix)
            if isinstance(problem, Problem):
                return dead_letter(key, index, problem.error_type, problem.message, exts[0])
        return self._finish(key, index, files[exts[0]], exts[0], files.get("cls"), files.get("json"))

    def row_member(self, key: str, data: Any, ext: str, label: Any, meta: Any,
                   problem: Problem | None = None) -> Member:
        key, index, dup = self._next(key)
        if dup is not None:
            return dup
        if problem is not None:
            return dead_letter(key, index, problem.error_type, problem.message, ext)
        if data is None:
            return dead_letter(key, index, "NullImage", "image column is null in this row")
        return self._finish(key, index, bytes(data), ext or sniff_ext(data), label, meta)

    def image_member(self, key: str, data: bytes | None, ext: str, error: Problem | None) -> Member:
        key, index, dup = self._next(key)
        if dup is not None:
            return dup
        if error is not None:
            return dead_letter(key, index, error.error_type, error.message, ext)
        return Member(key, index, data, ext, None, None)

    @staticmethod
    def _finish(key: str, index: int, data: Any, ext: str, label: Any, meta: Any) -> Member:
        try:
            parsed_label = parse_label(label)
        except (ValueError, TypeError, UnicodeDecodeError, OverflowError) as exc:
            why = "is out of the int64 range" if isinstance(exc, OverflowError) else "is not an integer"
            return dead_letter(key, index, "BadLabel", f"label {label!r:.40} {why}", ext)
        try:
            parsed_meta = parse_meta(meta)
        except (ValueError, TypeError, UnicodeDecodeError, RecursionError) as exc:
            return dead_letter(key, index, "BadMeta", f"metadata is not a strict JSON object ({exc})", ext)
        return Member(key, index, data, ext, parsed_label, parsed_meta)


def _no_image(key: str, index: int, files: dict[str, Any]) -> Member:
    found = ", ".join(f".{s}" if s else "(no extension)" for s in files)
    if all(s in _TEXT_SUFFIXES for s in files):
        return dead_letter(key, index, "NoImageMember", f"no image member (found: {found})")
    hint = ""
    if any(s.rsplit(".", 1)[-1] in SUPPORTED_EXTS for s in files):
        hint = " (the key ends at the first dot of the file name, as in WebDataset)"
    return dead_letter(key, index, "NotAnImage",
                       f"not an image: {key} has {found}; expected one of .{', .'.join(SUPPORTED_EXTS)}{hint}")


def parse_label(value: Any) -> int | None:
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


def parse_meta(value: Any) -> dict | None:
    if value is None:
        return None
    if isinstance(value, (bytes, str)):
        value = json.loads(value, parse_constant=_no_constant)  # NaN, Infinity: rejected, as strict JSON does
    if not isinstance(value, dict):
        raise ValueError(f"got {type(value).__name__}")
    json.dumps(value, allow_nan=False)  # a struct column may hold NaN floats: the meta column must stay JSON
    return value


def sniff_ext(data: bytes) -> str:
    """The image extension that ``data``'s first bytes announce (``""`` when none is known)."""
    head = bytes(data[:12])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"):
        return "avif"
    if head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS:
        return "heic"
    return next((ext for magic, ext in _MAGIC if head.startswith(magic)), "")
