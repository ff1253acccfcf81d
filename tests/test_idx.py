"""read_idx / labels_url_for on the embedded demo slices, local and memory://, plus malformed files."""
from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import fsspec
import numpy as np
import pytest

from pipeline.idx import is_idx_url, labels_url_for, parse_idx, read_idx
from vae_model.errors import ShardError, StorageError

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo"
MNIST = DEMO / "mnist-200-images-idx3-ubyte.gz"
FASHION = DEMO / "fashion-mnist-2k-images-idx3-ubyte.gz"


@pytest.fixture
def memfs():
    fs = fsspec.filesystem("memory")
    fs.store.clear()
    fs.pseudo_dirs.clear()
    fs.pseudo_dirs.append("")
    yield fs
    fs.store.clear()
    fs.pseudo_dirs.clear()
    fs.pseudo_dirs.append("")


def idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    return bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def test_demo_slices():
    images = read_idx(str(MNIST))
    assert images.shape == (200, 28, 28) and images.dtype == np.uint8
    labels = read_idx(labels_url_for(str(MNIST)))
    assert labels.shape == (200,) and set(labels.tolist()) <= set(range(10))
    assert labels[:4].tolist() == [7, 2, 1, 0]  # the first MNIST test digits
    fashion = read_idx(str(FASHION))
    assert fashion.shape == (2000, 28, 28) and fashion.max() == 255


def test_uncompressed_and_memory_urls_read_the_same(tmp_path, memfs):
    raw = gzip.decompress(MNIST.read_bytes())
    plain = tmp_path / "t10k-images-idx3-ubyte"
    plain.write_bytes(raw)
    memfs.pipe_file("/idx/t10k-images-idx3-ubyte", raw)
    expected = read_idx(str(MNIST))
    assert np.array_equal(read_idx(str(plain)), expected)
    assert np.array_equal(read_idx(f"file://{plain}"), expected)
    assert np.array_equal(read_idx("memory://idx/t10k-images-idx3-ubyte"), expected)


def test_labels_url_for(tmp_path, memfs):
    assert labels_url_for(str(MNIST)) == str(DEMO / "mnist-200-labels-idx1-ubyte.gz")
    shutil.copy(MNIST, tmp_path / "train-images-idx3-ubyte.gz")
    assert labels_url_for(str(tmp_path / "train-images-idx3-ubyte.gz")) is None  # no labels beside it
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"x")
    assert labels_url_for(str(tmp_path / "train-images-idx3-ubyte")) == str(tmp_path / "train-labels-idx1-ubyte")
    assert labels_url_for(str(tmp_path / "photo.png")) is None
    memfs.pipe_file("/m/t10k-labels.idx1-ubyte", b"x")
    assert labels_url_for("memory://m/t10k-images.idx3-ubyte") == "memory://m/t10k-labels.idx1-ubyte"


def test_is_idx_url():
    assert is_idx_url("s3://b/train-images-idx3-ubyte.gz")
    assert is_idx_url("/d/t10k-labels-idx1-ubyte")
    assert not is_idx_url("/d/images/")


def test_other_dtypes_are_native():
    arr = np.arange(6, dtype=">i2").reshape(2, 3)
    out = parse_idx(idx_bytes(arr, 0x0B))
    assert out.dtype == np.int16 and out.dtype.isnative
    assert out.tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("raw,match", [
    (b"", "not an IDX file"),
    (b"\x01\x02\x08\x03" + b"\x00" * 20, "not an IDX file"),
    (b"\x00\x00\x07\x01\x00\x00\x00\x01\x00", "unknown IDX type code 0x07"),
    (b"\x00\x00\x08\x03\x00\x00", "truncated IDX header"),
    (idx_bytes(np.zeros((2, 3, 3), np.uint8))[:-1], "truncated or corrupt"),
    (idx_bytes(np.zeros((2, 3, 3), np.uint8)) + b"\x00", "truncated or corrupt"),
])
def test_malformed(raw, match, tmp_path):
    path = tmp_path / "bad-images-idx3-ubyte"
    path.write_bytes(raw)
    with pytest.raises(ShardError, match=match):
        read_idx(str(path))


def test_corrupt_gzip_and_missing_file(tmp_path):
    path = tmp_path / "x-images-idx3-ubyte.gz"
    path.write_bytes(MNIST.read_bytes()[:1000])
    with pytest.raises(ShardError, match="corrupt gzip"):
        read_idx(str(path))
    with pytest.raises(StorageError, match="not found"):
        read_idx(str(tmp_path / "missing-images-idx3-ubyte"))
