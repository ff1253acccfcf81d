"""Parquet shards (pipeline/parquet_reader.py): columns, Hugging Face structs, damage."""
from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

from shard_helpers import members, png, put

pytest_plugins = ["shard_helpers"]  # fixtures: base, memfs


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


def test_dictionary_encoded_and_large_binary_columns(base):
    """Arrow types a writer may keep in the schema: dictionary<binary> images and metadata, large_binary."""
    images = [png(1), png(2), png(1)]  # a repeated image: what dictionary encoding is for
    table = pa.table({"key": pa.array(["a", "b", "c"]).dictionary_encode(),
                      "image": pa.array(images, pa.binary()).dictionary_encode(),
                      "json": pa.array(['{"s": 1}', None, '{"s": 1}']).dictionary_encode()})
    large = pa.table({"key": ["d"], "image": pa.array([png(3)], pa.large_binary())})
    for name, t in (("dict", table), ("large", large)):
        buf = io.BytesIO()
        pq.write_table(t, buf)
        put(f"{base}/{name}.parquet", buf.getvalue())
    got = members(base)
    assert [(m.key, m.data, m.meta, m.error) for m in got] == [
        ("a", png(1), {"s": 1}, None), ("b", png(2), None, None), ("c", png(1), {"s": 1}, None),
        ("d", png(3), None, None)]
