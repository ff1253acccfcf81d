"""Image-folder shards (pipeline/folder_reader.py): keys from paths, missing files, odd names."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.shard_file import ShardReadError
from pipeline.shard_listing import expand_shards
from pipeline.shards import ShardSpec, iter_members
from shard_helpers import members, png, put

pytest_plugins = ["shard_helpers"]  # fixtures: base, memfs


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


def test_latin1_file_names_in_a_folder_shard(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, data in [(b"caf\xe9.png", png(1)), (b"ok.png", png(2)), (b"100%.png", png(3))]:
        (Path(os.fsdecode(os.fsencode(folder) + b"/" + name))).write_bytes(data)
    got = members(str(folder))
    assert [(m.key, m.data, m.error) for m in got] == [("100%25", png(3), None), ("caf%E9", png(1), None),
                                                       ("ok", png(2), None)]
