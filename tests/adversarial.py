"""Adversarial shards: small real tar / Parquet / folder shards that each exercise one way input goes wrong.

``write_all(root)`` writes every case under ``root`` and returns ``{shard file or folder name:
members it contains}``, the count reconciliation must find: each member is a key group of a
tar (a repeated suffix starts a new one), a Parquet row, or a listed image file; an unreadable
shard counts as one. Everything is a few KB (the huge-canvas PNG only *declares* 13000 x 13000),
so the whole set is written and embedded in seconds. Use with :data:`LIMITS`, the read limits
the oversized cases are sized for.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.shards import ReadLimits

LIMITS = ReadLimits(max_member_bytes=64 << 10, max_sidecar_bytes=4 << 10)
BIG = (64 << 10) + 1  # one byte over LIMITS.max_member_bytes
LATIN1 = "caf\xe9"  # 'café': byte 0xE9 on disk, not valid UTF-8


def png(value: int = 128, size: int = 28, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (size, size), value if mode == "L" else (value,) * len(mode)).save(buf, format="PNG")
    return buf.getvalue()


def canvas_png(width: int, height: int) -> bytes:
    """A ~70-byte PNG whose header declares ``width x height`` pixels (CRC fixed): a decompression trap."""
    data = bytearray(png(0, size=1))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def noise(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


# A tar entry: (name, bytes) for a regular file, or (name, tarfile type, linkname) for anything else.
Entry = tuple


def tar_bytes(entries: list[Entry], encoding: str = "utf-8", fmt: int = tarfile.GNU_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding=encoding) as tf:
        for entry in entries:
            info = tarfile.TarInfo(entry[0])
            if len(entry) == 2:
                info.size = len(entry[1])
                tf.addfile(info, io.BytesIO(entry[1]))
            else:
                info.type, info.linkname = entry[1], entry[2]
                tf.addfile(info)
    return buf.getvalue()


def _parquet(path: Path, table: pa.Table, **kwargs) -> None:
    pq.write_table(table, path, **kwargs)


# --------------------------------------------------------------------------- tar cases
# Each returns (file name, bytes, members it contains).

def latin1_names() -> tuple[str, bytes, int]:
    # GNU tar of a Latin-1 file system: the name bytes are not UTF-8; Python reads them surrogate-escaped.
    return "latin1.tar", tar_bytes([(f"{LATIN1}.png", png(1)), (f"{LATIN1}.cls", b"1"), ("ok.png", png(2)),
                                    (f"dir-{LATIN1}/x.png", png(3))], encoding="latin-1"), 3


def overflowing_label() -> tuple[str, bytes, int]:
    return "label.tar", tar_bytes([("big.png", png()), ("big.cls", b"99999999999999999999"),
                                   ("neg.png", png()), ("neg.cls", b"-9223372036854775809"),
                                   ("ok.png", png()), ("ok.cls", b"9223372036854775807")]), 3


def duplicates() -> tuple[str, bytes, int]:
    # adjacent a.png, a.png; then a again after b; and a repeated sidecar
    return "dups.tar", tar_bytes([("a.png", png(1)), ("a.png", png(2)), ("b.png", png(3)), ("a.png", png(4)),
                                  ("c.png", png(5)), ("c.cls", b"1"), ("c.cls", b"2")]), 6


def links() -> tuple[str, bytes, int]:
    return "links.tar", tar_bytes([
        ("a.png", png(7)), ("a.cls", b"3"),
        ("b.png", tarfile.LNKTYPE, "a.png"),  # hard link to an earlier member: a row with a's pixels
        ("b.cls", tarfile.LNKTYPE, "./a.cls"),
        ("c.png", tarfile.LNKTYPE, "nowhere.png"),  # target not in the tar
        ("d.png", tarfile.SYMTYPE, "a.png"),
        ("e.png", tarfile.FIFOTYPE, ""), ("f.png", tarfile.CHRTYPE, ""), ("g.jpg", tarfile.BLKTYPE, ""),
        ("h.png", png(8)), ("h.json", tarfile.SYMTYPE, "/etc/passwd"),
        ("sub", tarfile.DIRTYPE, ""),  # directories are not members
    ]), 8


def links_gz() -> tuple[str, bytes, int]:
    big = noise(3000, seed=5)  # an incompressible earlier member the link must seek past
    raw = tar_bytes([("a.png", png(9)), ("pad.bin", big), ("b.png", tarfile.LNKTYPE, "a.png"),
                     ("c.png", tarfile.LNKTYPE, "pad.bin")])
    return "links.tar.gz", gzip.compress(raw, mtime=0), 4


def damaged() -> list[tuple[str, bytes, int]]:
    whole = tar_bytes([(f"{i:03d}.png", png(i, size=16)) for i in range(5)], fmt=tarfile.USTAR_FORMAT)
    return [
        # cut inside member 2's data: 000, 001 are rows, 002 and the rest one TruncatedShard
        ("truncated.tar", whole[:1024 * 2 + 512 + 30], 3),
        ("junk.tar", b"this is not a tar archive " * 40, 1),
        ("empty.tar", tar_bytes([]), 0),
    ]


def odd_members() -> tuple[str, bytes, int]:
    good = png(50)
    return "odd.tar", tar_bytes([
        ("corrupt.png", b"\x89PNG\r\n\x1a\n" + noise(300)),
        ("trunc.png", good[: len(good) // 2]),
        ("zero.png", b""),
        ("notes.txt", b"not an image"),
        ("blob.bin", b"\x00\x01"),
        ("only.json", b'{"sidecar": "without an image"}'),
        ("canvas.png", canvas_png(13000, 13000)),  # 169 Mpx declared: refused before decoding
        ("meta.png", good), ("meta.json", b'{"pad": "' + b"x" * (5 << 10) + b'"}'),  # over the sidecar cap
        ("nan.png", good), ("nan.json", b'{"x": NaN, "y": Infinity}'),
        ("huge.png", noise(BIG)),
        ("../up.png", good), ("/abs.png", png(60)), ("./dot.png", png(70)),
        ("UPPER.PNG", good), ("Mixed.JpG", _jpeg()),
        ("a.b.png", good),  # key "a", suffix "b.png": not an image under the WebDataset rule
        ("pct%41.png", good), ("pct%41.cls", b"2"),
        ("._hidden.png", b"macOS resource fork"),  # hidden: not a member
    ]), 17


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(buf, format="JPEG")
    return buf.getvalue()


TAR_CASES: tuple[Callable, ...] = (latin1_names, overflowing_label, duplicates, links, links_gz, odd_members)


# --------------------------------------------------------------------------- Parquet cases

def write_parquet(root: Path) -> dict[str, int]:
    table = pa.table({
        "key": ["ok", "dup", "dup", None, "big-label", "nan", "huge", "big-meta", "null", "%2F", LATIN1.encode(
            "utf-8").decode()],
        "image": pa.array([png(1), png(2), png(3), png(4), png(5), png(6), noise(BIG), png(7), None, png(8), png(9)],
                          pa.binary()),
        "label": pa.array([1, 2, 3, 4, 2 ** 64 - 1, 6, 7, 8, 9, 10, 11], pa.uint64()),
        "json": ['{"a": 1}', None, None, None, None, '{"x": NaN}', None, json.dumps({"p": "x" * (5 << 10)}), None,
                 None, None],
    })
    _parquet(root / "rows.parquet", table, row_group_size=4)
    hf = pa.table({"img": pa.array([{"bytes": canvas_png(9000, 9000), "path": "x.PNG"},
                                    {"bytes": noise(BIG, 3), "path": "y.png"}, None],
                                   pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                   "meta": pa.array([{"v": 1.0}, {"v": 2.0}, {"v": float("nan")}],
                                    pa.struct([("v", pa.float64())]))})
    _parquet(root / "hf.parquet", hf)
    (root / "broken.parquet").write_bytes(b"PAR1 not a parquet file")
    return {"rows.parquet": 11, "hf.parquet": 3, "broken.parquet": 1}


# --------------------------------------------------------------------------- folder case

def write_folder(root: Path) -> int:
    """Image files in ``root/folder``: Latin-1 names (surrogate-escaped by os.listdir), an oversized file,
    a zero-byte one, same stem twice, upper-case extensions, an animated GIF, a multi-page TIFF, a
    symbolic link to an image outside the folder and a dangling one, and a text file (ignored, not
    a member). Returns the number of members (image files)."""
    folder = root / "folder"
    (folder / "sub").mkdir(parents=True)
    bfolder = os.fsencode(folder)
    for name, data in [(f"{LATIN1}.png".encode("latin-1"), png(1)), (b"sub/" + b"\xff\xfe.jpg", _jpeg()),
                       (b"ok.png", png(2)), (b"ok.jpg", _jpeg()), (b"UP.PNG", png(3)), (b"zero.bmp", b""),
                       (b"huge.png", noise(BIG, 4)), (b"pct%25.png", png(4))]:
        with open(os.path.join(bfolder, name), "wb") as f:
            f.write(data)
    frames = [Image.new("RGB", (30, 20), c) for c in ((200, 10, 10), (10, 10, 200))]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    frames[0].save(folder / "scan.TIF", save_all=True, append_images=frames[1:])
    target = root.parent / f"{root.name}-link-target.png"  # outside root: not a member of its own
    target.write_bytes(png(5))
    (folder / "linked.png").symlink_to(target)
    (folder / "dangling.jpg").symlink_to(root.parent / "nowhere.jpg")
    (folder / "notes.txt").write_text("not an image")
    return 12


def write_all(root: Path) -> dict[str, int]:
    """Write every adversarial shard under ``root``; return ``{name: members}`` (folder shard: ``"folder"``)."""
    root.mkdir(parents=True, exist_ok=True)
    expected: dict[str, int] = {}
    for name, data, members in [case() for case in TAR_CASES] + damaged():
        (root / name).write_bytes(data)
        expected[name] = members
    expected.update(write_parquet(root))
    expected["folder"] = write_folder(root)
    return expected
