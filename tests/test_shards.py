"""Shard reading and writing on real files: local folders and memory://, tar, Parquet and image folders."""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.decode import decode_image
from pipeline.idx import read_idx
from pipeline.shards import Member, ShardReadError, ShardSpec, expand_shards, iter_members, write_shards
from vae_model.errors import NoShardsError, ShardError, StorageError

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo"
FASHION = DEMO / "fashion-mnist-2k-images-idx3-ubyte.gz"
MNIST = DEMO / "mnist-200-images-idx3-ubyte.gz"


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


# ----------------------------------------------------------------------------- round trips


def test_tar_round_trip_with_sidecars(base):
    files = [("a.png", png(10)), ("a.cls", b"3"), ("a.json", b'{"src": "x"}'),
             ("sub/b.cls", b" 7\n"), ("sub/b.jpg", png(20)),  # order inside a group does not matter
             ("c.webp", png(30)), ("c.txt", b"a caption")]
    put(f"{base}/shard-0.tar", tar_bytes(files))
    got = members(f"{base}/shard-0.tar")
    assert [(m.key, m.index, m.ext, m.label, m.meta, m.error) for m in got] == [
        ("a", 0, "png", 3, {"src": "x"}, None),
        ("sub/b", 1, "jpg", 7, None, None),
        ("c", 2, "webp", None, None, None),
    ]
    assert [m.data for m in got] == [png(10), png(20), png(30)]


def test_parquet_round_trip(base):
    table = pa.table({
        "key": ["k0", "k1", None],
        "image": pa.array([png(1), png(2), png(3)], pa.binary()),
        "label": pa.array([4, None, 6], pa.int64()),
        "json": ['{"a": 1}', None, '{"b": [2]}'],
        "other": [1.0, 2.0, 3.0],
    })
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=2)
    put(f"{base}/part.parquet", buf.getvalue())
    got = members(base)
    assert [(m.key, m.index, m.ext, m.label, m.meta, m.error) for m in got] == [
        ("k0", 0, "png", 4, {"a": 1}, None),
        ("k1", 1, "png", None, None, None),
        ("00000002", 2, "png", 6, {"b": [2]}, None),  # null key falls back to the row number
    ]
    assert [m.data for m in got] == [png(1), png(2), png(3)]


def test_parquet_huggingface_image_struct(base):
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "img": pa.array([{"bytes": png(5), "path": "x/a.PNG"}, {"bytes": None, "path": "b.png"}], image_type),
        "class": [1, 2],
    })
    buf = io.BytesIO()
    pq.write_table(table, buf)
    put(f"{base}/hf.parquet", buf.getvalue())
    first, second = members(f"{base}/hf.parquet")
    assert (first.key, first.data, first.ext, first.label) == ("00000000", png(5), "png", 1)
    assert (second.error_type, second.data) == ("NullImage", None)


def test_image_folder_round_trip(base):
    for name, value in [("a.png", 1), ("b.jpg", 2), ("sub/c.bmp", 3), ("sub/deep/d.webp", 4), ("e.jpeg", 5)]:
        put(f"{base}/imgs/{name}", png(value))
    put(f"{base}/imgs/notes.txt", b"ignored")
    put(f"{base}/imgs/.hidden.png", b"ignored")
    specs = expand_shards(f"{base}/imgs", images_per_group=2)
    assert [s.format for s in specs] == ["images"] * 3
    assert [s.name.rsplit("/", 1)[-1] for s in specs] == ["images-00000", "images-00001", "images-00002"]
    assert all(s.name.startswith(("memory://", "/")) for s in specs)
    got = [m for s in specs for m in iter_members(s)]
    assert [(m.key, m.ext, m.data) for m in got] == [
        ("a", "png", png(1)), ("b", "jpg", png(2)), ("e", "jpeg", png(5)),
        ("sub/c", "bmp", png(3)), ("sub/deep/d", "webp", png(4))]
    assert [m.index for m in got] == [0, 1, 0, 1, 0]


def test_image_folder_missing_file_fails_the_shard(base):
    put(f"{base}/imgs/a.png", png(1))
    spec = expand_shards(f"{base}/imgs")[0]
    spec = ShardSpec(spec.name, "images", spec.urls + (spec.urls[0].replace("a.png", "gone.png"),))
    it = iter_members(spec)
    assert next(it).error is None
    with pytest.raises(ShardReadError, match="gone.png: not found"):  # storage, not data: no dead letter
        next(it)


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


# ----------------------------------------------------------------------------- IDX conversion


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


# ----------------------------------------------------------------------------- damaged shards


@pytest.mark.parametrize("cut,n_ok", [
    (1024 * 2 + 512 + 30, 2),  # inside member 2's data
    (1024 * 3 + 100, 2),  # inside member 3's header: member 2 may have had more files, so it is skipped too
    (1024 * 4, 3),  # exactly between members
    (1024 * 5, 4),  # every member, but no end-of-archive block
])
def test_truncated_tar_yields_good_members_then_truncated(tmp_path, cut, n_ok):
    good = tar_bytes([(f"{i:03d}.png", png(i, size=16)) for i in range(5)])  # each member: 512 header + 512 data
    path = tmp_path / "cut.tar"
    path.write_bytes(good[:cut])
    *ok, last = iter_members(ShardSpec(str(path), "tar", (str(path),)))
    assert [(m.key, m.data, m.error) for m in ok] == [(f"{i:03d}", png(i, size=16), None) for i in range(n_ok)]
    assert (last.key, last.data, last.error_type, last.index) == ("__truncated__", None, "TruncatedShard", n_ok)
    assert last.error.startswith(f"truncated or corrupt tar after {n_ok} members: ")


def test_intact_tar_without_record_padding_is_complete(tmp_path):
    good = tar_bytes([(f"{i:03d}.png", png(i, size=16)) for i in range(5)])
    path = tmp_path / "short.tar"
    path.write_bytes(good[:1024 * 5 + 512])  # one end-of-archive block is enough
    assert [m.error for m in members(str(path))] == [None] * 5


def test_truncated_gzipped_tar(tmp_path):
    import gzip
    good = gzip.compress(tar_bytes([(f"{i:03d}.png", png(i, size=32)) for i in range(20)]), mtime=0)
    path = tmp_path / "s.tar.gz"
    path.write_bytes(good[: len(good) * 2 // 3])
    got = members(str(path))
    assert got[-1].error_type == "TruncatedShard" and len(got) > 1


def test_non_image_members_become_errors(tmp_path):
    path = tmp_path / "s.tar"
    path.write_bytes(tar_bytes([
        ("a.png", png(1)), ("b.bin", b"\x00\x01"), ("c.txt", b"hi"), ("d.cls", b"1"), ("d.json", b"{}"),
        ("e.png", png(2)), ("e.cls", b"cat"), ("f.png", png(3)), ("f.json", b"[1]"), ("README", b"x"),
        ("a.png", png(4)),  # the key "a" again, not consecutive
        ("._a.png", b"macOS resource fork"),
    ]))
    got = members(str(path))
    assert [(m.key, m.error_type) for m in got] == [
        ("a", None), ("b", "NotAnImage"), ("c", "NoImageMember"), ("d", "NoImageMember"), ("e", "BadLabel"),
        ("f", "BadMeta"), ("README", "NotAnImage"), ("a#7", "DuplicateKey")]
    assert got[2].error == "no image member (found: .txt)"
    assert got[3].error == "no image member (found: .cls, .json)"
    assert "b.bin" in got[1].error or ".bin" in got[1].error
    assert all(m.data is None for m in got[1:])
    assert [m.index for m in got] == list(range(8))


def test_empty_tar_yields_nothing(tmp_path):
    path = tmp_path / "empty.tar"
    path.write_bytes(tar_bytes([]))
    assert members(str(path)) == []


@pytest.mark.parametrize("name,data", [("zero.tar", b""), ("junk.tar", b"this is not a tar file" * 50),
                                       ("junk.parquet", b"PAR1 not really"), ("empty.parquet", b"")])
def test_unreadable_shard_is_one_error_member(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    [m] = members(str(path))
    assert (m.key, m.data, m.error_type) == ("__shard__", None, "UnreadableShard")
    assert str(path) in m.error


def test_missing_shard_file_fails_the_shard(tmp_path):
    spec = ShardSpec(str(tmp_path / "gone.tar"), "tar", (str(tmp_path / "gone.tar"),))
    with pytest.raises(ShardReadError, match="gone.tar: not found"):
        list(iter_members(spec))


def test_truncated_parquet(tmp_path):
    buf = io.BytesIO()
    pq.write_table(pa.table({"image": pa.array([png(i) for i in range(10)], pa.binary())}), buf, row_group_size=2)
    path = tmp_path / "t.parquet"
    path.write_bytes(buf.getvalue()[:-100])  # footer gone
    [m] = members(str(path))
    assert m.error_type == "UnreadableShard"


def test_parquet_without_image_column(tmp_path):
    buf = io.BytesIO()
    pq.write_table(pa.table({"pixels": [1, 2], "image": ["not", "binary"]}), buf)
    (tmp_path / "p.parquet").write_bytes(buf.getvalue())
    [m] = members(str(tmp_path / "p.parquet"))
    assert m.error_type == "NoImageColumn" and "pixels, image" in m.error


# ----------------------------------------------------------------------------- expand_shards


def test_expand_glob_folder_mixed_and_nothing(base):
    for name in ["b/2.tar", "a/1.tar", "a/3.parquet", "img/x.png", "img/y.jpg", "c/readme.md", "a/.tmp.tar"]:
        put(f"{base}/{name}", b"x")
    names = lambda specs: [(s.format, norm(s.name)[len(base) + 1:]) for s in specs]  # noqa: E731
    assert names(expand_shards(f"{base}/*/*.tar")) == [("tar", "a/1.tar"), ("tar", "b/2.tar")]
    assert names(expand_shards(f"{base}/**/*.parquet")) == [("parquet", "a/3.parquet")]
    assert names(expand_shards(base)) == [("tar", "a/1.tar"), ("parquet", "a/3.parquet"), ("tar", "b/2.tar"),
                                          ("images", "images-00000")]
    [group] = expand_shards(f"{base}/img/")
    assert norm(group.name) == f"{base}/img/images-00000"
    assert tuple(map(norm, group.urls)) == (f"{base}/img/x.png", f"{base}/img/y.jpg")
    assert names(expand_shards(f"{base}/a/1.tar")) == [("tar", "a/1.tar")]
    assert tuple(map(norm, expand_shards(f"{base}/img/x.png")[0].urls)) == (f"{base}/img/x.png",)
    with pytest.raises(NoShardsError, match=r"no shards matched URL: .* \(expected .tar, .parquet or image files\)"):
        expand_shards(f"{base}/c")
    with pytest.raises(NoShardsError, match="no shards matched"):
        expand_shards(f"{base}/nope/*.tar")
    with pytest.raises(NoShardsError, match="no shards matched"):
        expand_shards(f"{base}/does-not-exist")


def test_expand_file_url(tmp_path):
    put(str(tmp_path / "s.tar"), tar_bytes([("a.png", png(1))]))
    [spec] = expand_shards(f"file://{tmp_path}")
    assert spec.name == str(tmp_path / "s.tar")
    assert [m.key for m in iter_members(spec)] == ["a"]


def test_unknown_format_spec():
    with pytest.raises(ShardError, match="unknown shard format"):
        iter_members(ShardSpec("x", "zip", ("x",)))


def test_member_data_matches_json_roundtrip(tmp_path):
    meta = {"caption": "ünïcode", "n": [1, 2]}
    put(str(tmp_path / "m.tar"), tar_bytes([("k.png", png(1)), ("k.json", json.dumps(meta).encode())]))
    [m] = members(str(tmp_path / "m.tar"))
    assert m.meta == meta



# ----------------------------------------------------------------------------- S3 (SeaweedFS from conftest)


def test_s3_write_expand_and_read(s3_server, s3_bucket):
    so = s3_server.storage_options
    s3 = s3_server.filesystem()
    s3.pipe_file(f"{s3_bucket[5:]}/img/a.png", png(1))
    s3.pipe_file(f"{s3_bucket[5:]}/img/sub/b.jpg", png(2))
    tars = write_shards(str(MNIST), f"{s3_bucket}/mnist/tar", shard_size=64, limit=100, storage_options=so)
    assert tars == [f"{s3_bucket}/mnist/tar/shard-000000.tar", f"{s3_bucket}/mnist/tar/shard-000001.tar"]
    [pq_url] = write_shards(str(MNIST), f"{s3_bucket}/mnist/pq", fmt="parquet", limit=100, storage_options=so)

    specs = expand_shards(s3_bucket, so)
    assert [(s.format, s.name) for s in specs] == [
        ("parquet", pq_url), ("tar", tars[0]), ("tar", tars[1]), ("images", f"{s3_bucket}/images-00000")]
    assert [s.name for s in expand_shards(f"{s3_bucket}/mnist/*/*.tar", so)] == tars
    images = read_idx(str(MNIST))[:100]
    for spec in specs[:3]:
        got = list(iter_members(spec, so))
        assert all(m.error is None for m in got)
        keys = [int(m.key) for m in got]
        assert np.array_equal(np.stack([decode_image(m.data, 1, 28)[0] for m in got]), images[keys])
    assert [(m.key, m.data) for m in iter_members(specs[3], so)] == [("img/a", png(1)), ("img/sub/b", png(2))]


def test_s3_missing_bucket_and_bad_credentials(s3_server, s3_bucket):
    so = s3_server.storage_options
    with pytest.raises(StorageError, match="the bucket does not exist"):
        expand_shards("s3://vaepipe-no-such-bucket/shards", so)
    with pytest.raises(NoShardsError):  # an existing bucket with nothing there is just "no shards"
        expand_shards(f"{s3_bucket}/empty/*.tar", so)
    with pytest.raises(StorageError, match="denied"):
        expand_shards(f"{s3_bucket}/x", dict(so, secret="wrong"))


# ----------------------------------------------------------------------------- adversarial members (issue 10)

from pipeline.shards import ReadLimits, ShardTally, escape_key, unescape_key  # noqa: E402

LATIN1_NAME = b"caf\xe9".decode("utf-8", "surrogateescape")  # how Python hands over the Latin-1 name b"caf\xe9"


def gnu_tar(entries, encoding="utf-8") -> bytes:
    """entries: (name, bytes) regular files or (name, tarfile type, linkname)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding=encoding) as tf:
        for entry in entries:
            info = tarfile.TarInfo(entry[0])
            if len(entry) == 2:
                info.size = len(entry[1])
                tf.addfile(info, io.BytesIO(entry[1]))
            else:
                info.type, info.linkname = entry[1], entry[2]
                tf.addfile(info)
    return buf.getvalue()


def tar_members(path, **kwargs) -> list[Member]:
    return list(iter_members(ShardSpec(str(path), "tar", (str(path),)), **kwargs))


@pytest.mark.parametrize("text,escaped", [
    ("plain/key-1", "plain/key-1"), ("ünïcode ok", "ünïcode ok"), ("50%", "50%25"), ("%E9", "%25E9"),
    (LATIN1_NAME, "caf%E9"), (b"\xff\xfe/%\xe9".decode("utf-8", "surrogateescape"), "%FF%FE/%25%E9"),
])
def test_escape_key_is_valid_utf8_and_reversible(text, escaped):
    assert escape_key(text) == escaped
    escaped.encode("utf-8")
    assert unescape_key(escaped) == text
    assert escape_key(unescape_key(escaped)) == escaped


def test_latin1_tar_member_names_become_escaped_keys(tmp_path):
    path = tmp_path / "latin1.tar"
    path.write_bytes(gnu_tar([("caf\xe9.png", png(1)), ("caf\xe9.cls", b"4"), ("d\xe9/x.png", png(2))],
                             encoding="latin-1"))
    got = tar_members(path)
    assert [(m.key, m.label, m.error) for m in got] == [("caf%E9", 4, None), ("d%E9/x", None, None)]
    assert os.fsencode(unescape_key(got[0].key)) == b"caf\xe9"


def test_latin1_file_names_in_a_folder_shard(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, data in [(b"caf\xe9.png", png(1)), (b"ok.png", png(2)), (b"100%.png", png(3))]:
        (Path(os.fsdecode(os.fsencode(folder) + b"/" + name))).write_bytes(data)
    got = members(str(folder))
    assert [(m.key, m.data, m.error) for m in got] == [("100%25", png(3), None), ("caf%E9", png(1), None),
                                                       ("ok", png(2), None)]


def test_labels_outside_int64_are_bad_labels(tmp_path):
    path = tmp_path / "labels.tar"
    path.write_bytes(tar_bytes([("a.png", png(1)), ("a.cls", b"99999999999999999999"),
                                ("b.png", png(2)), ("b.cls", b"-9223372036854775808")]))
    a, b = tar_members(path)
    assert (a.error_type, b.error_type, b.label) == ("BadLabel", None, -2 ** 63)
    assert "int64" in a.error
    buf = io.BytesIO()
    pq.write_table(pa.table({"image": pa.array([png(1), png(2)], pa.binary()),
                             "label": pa.array([2 ** 64 - 1, 5], pa.uint64())}), buf)
    (tmp_path / "u.parquet").write_bytes(buf.getvalue())
    assert [(m.error_type, m.label) for m in members(str(tmp_path / "u.parquet"))] == [("BadLabel", None), (None, 5)]


def test_adjacent_duplicate_names_are_duplicate_keys(tmp_path):
    path = tmp_path / "dups.tar"
    path.write_bytes(tar_bytes([("a.png", png(1)), ("a.png", png(2)), ("b.png", png(3)),
                                ("c.png", png(4)), ("c.cls", b"1"), ("c.cls", b"2")]))
    tally = ShardTally()
    got = tar_members(path, tally=tally)
    assert [(m.key, m.error_type) for m in got] == [("a", None), ("a#1", "DuplicateKey"), ("b", None),
                                                    ("c", None), ("c#4", "DuplicateKey")]
    assert got[0].data == png(1) and tally.members == 5


@pytest.mark.parametrize("gz", [False, True])
def test_hard_links_read_their_target_and_other_entries_are_dead_letters(tmp_path, gz):
    import gzip
    raw = gnu_tar([("a.png", png(1)), ("a.cls", b"7"), ("pad.bin", np.random.default_rng(0).bytes(5000)),
                   ("b.png", tarfile.LNKTYPE, "./a.png"), ("b.cls", tarfile.LNKTYPE, "a.cls"),
                   ("c.png", tarfile.LNKTYPE, "missing.png"), ("d.png", tarfile.SYMTYPE, "a.png"),
                   ("e.png", tarfile.FIFOTYPE, ""), ("f.jpg", tarfile.CHRTYPE, ""), ("g.bmp", tarfile.BLKTYPE, ""),
                   ("h.png", png(2)), ("h.json", tarfile.SYMTYPE, "/etc/passwd"), ("dir", tarfile.DIRTYPE, "")])
    path = tmp_path / ("links.tar.gz" if gz else "links.tar")
    path.write_bytes(gzip.compress(raw, mtime=0) if gz else raw)
    tally = ShardTally()
    got = tar_members(path, tally=tally)
    assert [(m.key, m.error_type) for m in got] == [
        ("a", None), ("pad", "NotAnImage"), ("b", None), ("c", "UnresolvedLink"), ("d", "NotARegularFile"),
        ("e", "NotARegularFile"), ("f", "NotARegularFile"), ("g", "NotARegularFile"), ("h", "NotARegularFile")]
    assert (got[2].data, got[2].label) == (png(1), 7)
    assert "symbolic link" in got[4].error and "FIFO" in got[5].error
    assert tally.members == len(got)
    too_small = tar_members(path, limits=ReadLimits(max_member_bytes=len(png(1)) - 1, max_sidecar_bytes=10))
    assert too_small[2].error_type == "MemberTooLarge" and "--max-member-bytes" in too_small[2].error


def test_member_size_caps_are_checked_before_reading(tmp_path):
    limits = ReadLimits(max_member_bytes=1000, max_sidecar_bytes=20)
    big = np.random.default_rng(0).bytes(1001)
    (tmp_path / "t.tar").write_bytes(tar_bytes([("a.png", big), ("b.png", png(1)), ("b.json", b'{"k": "' + b"x" * 20 + b'"}'),
                                                ("c.png", png(1)), ("c.json", b'{"x": NaN}')]))
    got = tar_members(tmp_path / "t.tar", limits=limits)
    assert [m.error_type for m in got] == ["MemberTooLarge", "MemberTooLarge", "BadMeta"]
    assert "--max-member-bytes" in got[0].error and "--max-sidecar-bytes" in got[1].error
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "big.png").write_bytes(big)
    (tmp_path / "imgs" / "ok.png").write_bytes(png(1))
    spec = expand_shards(str(tmp_path / "imgs"))[0]
    assert [m.error_type for m in iter_members(spec, limits=limits)] == ["MemberTooLarge", None]
    buf = io.BytesIO()
    pq.write_table(pa.table({"image": pa.array([big, png(1), png(2)], pa.binary()),
                             "json": ['{"a": 1}', '{"a": "' + "y" * 30 + '"}', '{"a": Infinity}']}), buf)
    (tmp_path / "p.parquet").write_bytes(buf.getvalue())
    got = list(iter_members(expand_shards(str(tmp_path / "p.parquet"))[0], limits=limits))
    assert [m.error_type for m in got] == ["MemberTooLarge", "MemberTooLarge", "BadMeta"]


def test_tally_counts_what_the_shard_contains(tmp_path):
    path = tmp_path / "s.tar"
    path.write_bytes(tar_bytes([(f"{i}.png", png(i)) for i in range(4)] + [("x.txt", b"t")]))
    cut = tmp_path / "cut.tar"
    cut.write_bytes(path.read_bytes()[:1024 * 2 + 600])
    buf = io.BytesIO()
    pq.write_table(pa.table({"image": pa.array([png(i) for i in range(7)], pa.binary())}), buf, row_group_size=3)
    (tmp_path / "p.parquet").write_bytes(buf.getvalue())
    (tmp_path / "junk.tar").write_bytes(b"junk" * 300)
    for name, n in [("s.tar", 5), ("cut.tar", 3), ("p.parquet", 7), ("junk.tar", 1)]:
        [spec] = expand_shards(str(tmp_path / name))
        tally = ShardTally()
        assert len(list(iter_members(spec, tally=tally))) == tally.members == n, name


def test_s3_adversarial_tar_members(s3_server, s3_bucket):
    so = s3_server.storage_options
    s3 = s3_server.filesystem()
    s3.pipe_file(f"{s3_bucket[5:]}/adv/s.tar", gnu_tar([
        ("caf\xe9.png", png(1)), ("caf\xe9.cls", b"99999999999999999999"), ("ok.png", png(2)), ("ok.png", png(3)),
        ("lnk.png", tarfile.LNKTYPE, "ok.png"), ("sym.png", tarfile.SYMTYPE, "ok.png"),
        ("big.png", np.random.default_rng(0).bytes(2000))], encoding="latin-1"))
    [spec] = expand_shards(f"{s3_bucket}/adv", so)
    tally = ShardTally()
    got = list(iter_members(spec, so, limits=ReadLimits(1000, 100), tally=tally))
    assert [(m.key, m.error_type) for m in got] == [
        ("caf%E9", "BadLabel"), ("ok", None), ("ok#2", "DuplicateKey"), ("lnk", None), ("sym", "NotARegularFile"),
        ("big", "MemberTooLarge")]
    assert got[3].data == png(3) and tally.members == 6  # a link names the latest member of that name, as tar does
