"""Shared helpers for the shard tests: tiny images, tars, files on local disk and memory://."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import fsspec
import pytest
from PIL import Image

from pipeline.shards import Member, ShardSpec, expand_shards, iter_members

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo"
FASHION = DEMO / "fashion-mnist-2k-images-idx3-ubyte.gz"
MNIST = DEMO / "mnist-200-images-idx3-ubyte.gz"
LATIN1_NAME = b"caf\xe9".decode("utf-8", "surrogateescape")  # how Python hands over the Latin-1 name b"caf\xe9"


def clear_memory_fs() -> fsspec.AbstractFileSystem:
    fs = fsspec.filesystem("memory")
    fs.store.clear()
    fs.pseudo_dirs.clear()
    fs.pseudo_dirs.append("")
    return fs


@pytest.fixture
def memfs():
    yield clear_memory_fs()
    clear_memory_fs()


@pytest.fixture(params=["local", "memory"])
def base(request, tmp_path):
    """An empty folder URL on the local disk or in fsspec's memory filesystem."""
    if request.param == "local":
        yield str(tmp_path / "data")
        return
    clear_memory_fs()
    yield "memory://vaepipe-test"
    clear_memory_fs()


def norm(url: str) -> str:
    """fsspec spells memory URLs with three slashes (memory:///x) once listed."""
    return url.replace("memory:///", "memory://")


def put(url: str, data: bytes) -> None:
    with fsspec.open(url, "wb", auto_mkdir=True) as f:
        f.write(data)


def get(url: str) -> bytes:
    with fsspec.open(url, "rb") as f:
        return f.read()


def png(value: int, size: int = 6, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (size, size), value if mode == "L" else (value, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def tar_bytes(files: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def members(url: str, **kwargs) -> list[Member]:
    return [m for spec in expand_shards(url, **kwargs) for m in iter_members(spec)]


def gnu_tar(entries, encoding="utf-8") -> bytes:
    """entries: (name, bytes) regular files or (name, tarfile type, linkname)."""
    from adversarial import tar_bytes as entries_tar  # the generator's writer, GNU format

    return entries_tar(entries, encoding=encoding)


def tar_members(path, **kwargs) -> list[Member]:
    return list(iter_members(ShardSpec(str(path), "tar", (str(path),)), **kwargs))
