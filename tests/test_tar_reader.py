"""Tar shards (pipeline/tar_reader.py): key groups, sidecars, damage, hard links, odd names."""
from __future__ import annotations

import gzip
import os
import tarfile

import numpy as np
import pytest

from pipeline.members import ReadLimits, ShardTally, unescape_key
from pipeline.shard_listing import expand_shards
from pipeline.shards import ShardSpec, iter_members
from shard_helpers import gnu_tar, members, png, put, tar_bytes, tar_members

pytest_plugins = ["shard_helpers"]  # fixtures: base, memfs


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


def test_latin1_tar_member_names_become_escaped_keys(tmp_path):
    path = tmp_path / "latin1.tar"
    path.write_bytes(gnu_tar([("caf\xe9.png", png(1)), ("caf\xe9.cls", b"4"), ("d\xe9/x.png", png(2))],
                             encoding="latin-1"))
    got = tar_members(path)
    assert [(m.key, m.label, m.error) for m in got] == [("caf%E9", 4, None), ("d%E9/x", None, None)]
    assert os.fsencode(unescape_key(got[0].key)) == b"caf\xe9"


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
