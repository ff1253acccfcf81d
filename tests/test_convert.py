"""Converting IDX files and image folders into shards (pipeline/convert.py), read back by the readers."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.convert import write_shards
from pipeline.decode import decode_image
from pipeline.idx import read_idx
from shard_helpers import DEMO, FASHION, MNIST, get, members, png, put
from vae_model.errors import NoShardsError, ShardError

pytest_plugins = ["shard_helpers"]  # fixtures: base, memfs


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_images_to_shards_copies_bytes_unchanged(base, fmt):
    sources = {"x.png": png(9), "dotted.name.jpg": png(8), "dir/y.bmp": png(7), "dir/y.png": png(6)}
    for name, data in sources.items():
        put(f"{base}/src/{name}", data)
    urls = write_shards(f"{base}/src", f"{base}/out", fmt=fmt, shard_size=3)
    assert [u.rsplit("/", 1)[-1] for u in urls] == [f"shard-000000.{fmt}", f"shard-000001.{fmt}"]
    got = members(f"{base}/out")
    assert [(m.key, m.data, m.label) for m in got] == [
        ("dir/y", sources["dir/y.bmp"], None), ("dir/y_png", sources["dir/y.png"], None),
        ("dotted_name", sources["dotted.name.jpg"], None), ("x", sources["x.png"], None)]
    # tar keeps the file extension; Parquet has no ext column, so the reader sniffs the bytes (all PNG here)
    assert [m.ext for m in got] == (["bmp", "png", "jpg", "png"] if fmt == "tar" else ["png"] * 4)


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
@pytest.mark.parametrize("source", [FASHION, MNIST])
def test_idx_conversion_is_lossless(tmp_path, fmt, source):
    done: list[int] = []
    urls = write_shards(str(source), str(tmp_path / "out"), fmt=fmt, shard_size=128, limit=300, progress=done.append)
    n = min(300, len(read_idx(str(source))))
    assert len(urls) == -(-n // 128) and sum(done) == n
    images = read_idx(str(source))[:n]
    labels = read_idx(str(source).replace("images-idx3", "labels-idx1"))[:n]
    got = members(str(tmp_path / "out"))
    assert [m.key for m in got] == [f"{i:08d}" for i in range(n)]
    assert all(m.error is None and m.ext == "png" for m in got)
    decoded = np.stack([decode_image(m.data, 1, 28)[0] for m in got])
    assert np.array_equal(decoded, images)
    assert [m.label for m in got] == labels.tolist()
    assert all(Image.open(io.BytesIO(m.data)).mode == "L" for m in got[:5])


def test_idx_to_memory_parquet_layout(memfs):
    urls = write_shards(str(MNIST), "memory://out", fmt="parquet", shard_size=150)
    assert urls == ["memory://out/shard-000000.parquet", "memory://out/shard-000001.parquet"]
    pf = pq.ParquetFile(io.BytesIO(get(urls[0])))
    assert pf.schema_arrow.names == ["key", "image", "label"]
    assert str(pf.schema_arrow.field("label").type) == "int64"
    assert pf.metadata.row_group(0).column(1).compression == "ZSTD"
    assert pf.metadata.num_rows == 150


def test_idx_without_labels_and_rgb(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    header = bytes([0, 0, 8, 4]) + b"".join(d.to_bytes(4, "big") for d in rgb.shape)
    (tmp_path / "rgb-images-idx3-ubyte").write_bytes(header + rgb.tobytes())
    write_shards(str(tmp_path / "rgb-images-idx3-ubyte"), str(tmp_path / "out"))
    got = members(str(tmp_path / "out"))
    assert [m.label for m in got] == [None] * 5
    assert np.array_equal(np.stack([decode_image(m.data, 3, 4) for m in got]), rgb.transpose(0, 3, 1, 2))


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_writing_is_deterministic(tmp_path, fmt):
    a = write_shards(str(MNIST), str(tmp_path / "a"), fmt=fmt, limit=50)
    b = write_shards(str(MNIST), str(tmp_path / "b"), fmt=fmt, limit=50)
    assert [Path(u).read_bytes() for u in a] == [Path(u).read_bytes() for u in b]
    again = write_shards(str(MNIST), str(tmp_path / "a"), fmt=fmt, limit=50)  # rerun into the same folder
    assert again == a
    if fmt == "tar":
        with tarfile.open(a[0]) as tf:
            info = tf.getmembers()[0]
        assert (info.name, info.mtime, info.mode, info.uid, info.uname) == ("00000000.png", 0, 0o644, 0, "")
        assert [i.name for i in tarfile.open(a[0]).getmembers()[:2]] == ["00000000.png", "00000000.cls"]


def test_write_errors(tmp_path):
    with pytest.raises(ShardError, match="--format must be tar or parquet"):
        write_shards(str(MNIST), str(tmp_path / "o"), fmt="zip")
    with pytest.raises(ShardError, match="labels"):
        write_shards(str(DEMO / "mnist-200-labels-idx1-ubyte.gz"), str(tmp_path / "o"))
    with pytest.raises(NoShardsError, match="no image files matched"):
        write_shards(str(tmp_path / "empty"), str(tmp_path / "o"))
    write_shards(str(MNIST), str(tmp_path / "o"), shard_size=100)
    with pytest.raises(ShardError, match="already holds 1 shard"):  # a smaller rerun would leave shard-000001
        write_shards(str(MNIST), str(tmp_path / "o"), shard_size=100, limit=100)
    with pytest.raises(ShardError, match="--shard-size"):
        write_shards(str(MNIST), str(tmp_path / "o"), shard_size=0)


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_folder_conversion_takes_every_format_and_says_what_it_ignored(tmp_path, caplog, fmt):
    src = tmp_path / "photos"
    src.mkdir()
    for name, codec in (("a.gif", "GIF"), ("b.tif", "TIFF"), ("c.avif", "AVIF"), ("d.JPG", "JPEG")):
        Image.new("RGB", (20, 10), (200, 30, 30)).save(src / name, format=codec)
    (src / "readme.txt").write_text("not an image")
    with caplog.at_level("WARNING", logger="pipeline.shard_listing"):
        [url] = write_shards(str(src), str(tmp_path / "out"), fmt=fmt, shard_size=10)
    got = members(url)  # tar keeps the extension; Parquet's reader sniffs it from the bytes
    assert [(m.key, m.ext) for m in got] == [("a", "gif"), ("b", "tif"), ("c", "avif"), ("d", "jpg")]
    assert all(decode_image(m.data, 3, 8)[:, 4, 4].tolist()[0] > 150 for m in got)  # red survives every codec
    assert any("ignored 1 file(s)" in r.getMessage() and "readme.txt" in r.getMessage() for r in caplog.records)
