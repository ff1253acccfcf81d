"""Building members (pipeline/members.py): escaped keys, labels, metadata, size caps, tallies."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.members import ReadLimits, ShardTally, escape_key, unescape_key
from pipeline.shard_listing import expand_shards
from pipeline.shards import iter_members
from shard_helpers import LATIN1_NAME, members, png, put, tar_bytes, tar_members


@pytest.mark.parametrize("text,escaped", [
    ("plain/key-1", "plain/key-1"), ("ünïcode ok", "ünïcode ok"), ("50%", "50%25"), ("%E9", "%25E9"),
    (LATIN1_NAME, "caf%E9"), (b"\xff\xfe/%\xe9".decode("utf-8", "surrogateescape"), "%FF%FE/%25%E9"),
])
def test_escape_key_is_valid_utf8_and_reversible(text, escaped):
    assert escape_key(text) == escaped
    escaped.encode("utf-8")
    assert unescape_key(escaped) == text
    assert escape_key(unescape_key(escaped)) == escaped


def test_member_data_matches_json_roundtrip(tmp_path):
    meta = {"caption": "ünïcode", "n": [1, 2]}
    put(str(tmp_path / "m.tar"), tar_bytes([("k.png", png(1)), ("k.json", json.dumps(meta).encode())]))
    [m] = members(str(tmp_path / "m.tar"))
    assert m.meta == meta


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
