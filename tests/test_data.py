"""Training data (jobs/data.py): a shard that storage cannot deliver fails training in one line."""
from __future__ import annotations

import io
import tarfile

import pytest
from PIL import Image
from torch.utils.data import DataLoader

from jobs.cli import _one_line_error
from jobs.data import ShardImageDataset
from pipeline.shards import ShardReadError, expand_shards


def _tar(path, n: int) -> None:
    with tarfile.open(path, "w") as tf:
        for i in range(n):
            buf = io.BytesIO()
            Image.new("L", (28, 28), i).save(buf, format="PNG")
            info = tarfile.TarInfo(f"{i:03d}.png")
            info.size = len(buf.getvalue())
            tf.addfile(info, io.BytesIO(buf.getvalue()))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_shard_gone_since_listing_fails_training_in_one_line(tmp_path, num_workers):
    _tar(tmp_path / "a.tar", 3)
    _tar(tmp_path / "b.tar", 3)
    specs = expand_shards(str(tmp_path))
    (tmp_path / "b.tar").unlink()  # not a dead letter to skip: the epoch would silently lose the shard
    ds = ShardImageDataset(specs, channels=1, size=28)
    with pytest.raises(Exception) as err:
        list(DataLoader(ds, batch_size=2, num_workers=num_workers))
    if num_workers == 0:
        assert isinstance(err.value, ShardReadError)
    line = _one_line_error(err.value).message  # what `vaepipe train` prints after "Error: "
    assert line.startswith(f"{tmp_path / 'b.tar'}: not found (storage failure"), line
