"""Listing shards (pipeline/shard_listing.py): globs, folders, file URLs, missing buckets."""
from __future__ import annotations


import pytest

from pipeline.shard_listing import check_output_outside_input, expand_shards
from pipeline.shards import iter_members
from shard_helpers import norm, png, put, tar_bytes
from vae_model.errors import ConfigError, NoShardsError, StorageError

pytest_plugins = ["shard_helpers"]  # fixtures: base, memfs


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


def test_s3_missing_bucket_and_bad_credentials(s3_server, s3_bucket):
    so = s3_server.storage_options
    with pytest.raises(StorageError, match="the bucket does not exist"):
        expand_shards("s3://vaepipe-no-such-bucket/shards", so)
    with pytest.raises(NoShardsError):  # an existing bucket with nothing there is just "no shards"
        expand_shards(f"{s3_bucket}/empty/*.tar", so)
    with pytest.raises(StorageError, match="denied"):
        expand_shards(f"{s3_bucket}/x", dict(so, secret="wrong"))


def test_output_inside_an_input_folder_is_refused(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.tar").write_bytes(b"")
    for out in (shards, shards / "latents", f"{shards}/", tmp_path / "shards" / ".." / "shards" / "x"):
        with pytest.raises(ConfigError, match="inside the input folder"):
            check_output_outside_input(str(shards), str(out))
    for data, out in ((shards, tmp_path / "latents"), (shards, tmp_path / "shards-out"),
                      (f"{shards}/*.tar", shards / "latents"), (shards / "a.tar", shards / "latents"),
                      ("memory://out-check/in", "memory://out-check/out")):
        check_output_outside_input(str(data), str(out))  # a glob or a file input cannot list the output back
    put("memory://out-check/in/a.tar", b"")
    with pytest.raises(ConfigError, match="inside the input folder"):
        check_output_outside_input("memory://out-check/in", "memory://out-check/in/latents")
