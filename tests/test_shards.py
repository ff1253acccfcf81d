"""The public face of shard reading (pipeline/shards.py): dispatch, re-exports, all formats on S3."""
from __future__ import annotations


import numpy as np
import pytest

import pipeline.shards
from pipeline.decode import decode_image
from pipeline.idx import read_idx
from pipeline.shards import ShardSpec, expand_shards, iter_members, write_shards
from shard_helpers import MNIST, png
from vae_model.errors import ShardError


def test_public_names_stay_importable_from_the_public_face():
    """Every name pipeline.shards offered before the split is still there (re-exported lazily)."""
    from pipeline import convert, members, parquet_reader, shard_file, shard_listing

    names = {"expand_shards": shard_listing, "TAR_SUFFIXES": shard_listing, "write_shards": convert,
             "escape_key": members, "unescape_key": members, "printable": members, "ReadLimits": members,
             "ShardTally": members, "ShardReadError": shard_file, "PARQUET_BATCH_ROWS": parquet_reader,
             "IMAGE_COLUMNS": parquet_reader, "KEY_COLUMNS": parquet_reader, "LABEL_COLUMNS": parquet_reader,
             "META_COLUMNS": parquet_reader}
    for name, module in names.items():
        assert getattr(pipeline.shards, name) is getattr(module, name), name
    assert set(names) | {"Member", "ShardSpec", "iter_members"} == set(pipeline.shards.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pipeline.shards.nope  # noqa: B018


def test_unknown_format_spec():
    with pytest.raises(ShardError, match="unknown shard format"):
        iter_members(ShardSpec("x", "zip", ("x",)))


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
