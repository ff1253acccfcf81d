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


def test_image_folder_file_gone_since_the_listing_is_a_dead_letter(base):
    put(f"{base}/imgs/a.png", png(1))
    put(f"{base}/imgs/b.png", png(2))
    spec = expand_shards(f"{base}/imgs")[0]
    spec = ShardSpec(spec.name, "images", spec.urls[:1] + (spec.urls[0].replace("a.png", "gone.png"),) + spec.urls[1:])
    got = list(iter_members(spec))  # the images around it are read; the gone one is counted, not skipped
    assert [(m.key, m.error_type) for m in got] == [("a", None), ("gone", "FileNotFound"), ("b", None)]
    assert "gone.png: listed but gone when read" in got[1].error


def test_image_folder_other_storage_failure_fails_the_shard(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "locked.png").mkdir(parents=True)  # a folder named like an image: reading it is an OS error
    spec = ShardSpec(f"{folder}/images-00000", "images", (str(folder / "locked.png"),))
    with pytest.raises(ShardReadError, match="locked.png"):  # storage, not data: no dead letter
        list(iter_members(spec))


def test_symbolic_links_are_followed_and_a_dangling_one_is_a_dead_letter(tmp_path):
    folder, elsewhere = tmp_path / "imgs", tmp_path / "store"
    folder.mkdir()
    elsewhere.mkdir()
    (elsewhere / "real.png").write_bytes(png(7))
    (folder / "a.png").write_bytes(png(1))
    (folder / "linked.png").symlink_to(elsewhere / "real.png")
    (folder / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    got = members(str(folder))
    assert [(m.key, m.data, m.error_type) for m in got] == [("a", png(1), None), ("dangling", None, "FileNotFound"),
                                                           ("linked", png(7), None)]


def test_files_that_are_not_images_are_ignored_with_one_warning(base, caplog):
    put(f"{base}/imgs/a.png", png(1))
    put(f"{base}/imgs/notes.txt", b"x")
    put(f"{base}/imgs/logo.svg", b"<svg/>")
    with caplog.at_level("WARNING", logger="pipeline.shard_listing"):
        specs = expand_shards(f"{base}/imgs")
    assert [len(s.urls) for s in specs] == [1]
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "ignored 2 file(s) that are not shards or images" in warned[0]
    assert "logo.svg" in warned[0]


@pytest.mark.parametrize("ext", ["gif", "tif", "tiff", "avif", "heic", "jfif", "jp2"])
def test_every_supported_extension_is_an_image_member(base, ext):
    put(f"{base}/imgs/a.{ext}", png(1))  # the name decides membership; the decoder sniffs the bytes
    assert [(m.key, m.ext) for m in members(f"{base}/imgs")] == [("a", ext)]


def test_latin1_file_names_in_a_folder_shard(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, data in [(b"caf\xe9.png", png(1)), (b"ok.png", png(2)), (b"100%.png", png(3))]:
        (Path(os.fsdecode(os.fsencode(folder) + b"/" + name))).write_bytes(data)
    got = members(str(folder))
    assert [(m.key, m.data, m.error) for m in got] == [("100%25", png(3), None), ("caf%E9", png(1), None),
                                                       ("ok", png(2), None)]
