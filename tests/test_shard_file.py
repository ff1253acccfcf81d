"""Storage failures while reading a shard fail the shard; only bad bytes are dead letters (issue 10).

A storage failure (S3 SlowDown past every retry, a file gone since it was listed) says nothing
about the data: it must not be committed as a dead letter, or a rerun with skip-existing would
keep the loss. It raises ``ShardReadError``, the run fails with one line, and a rerun repairs it.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.embed import ShardEmbedder
from pipeline.members import ShardTally
from pipeline.options import EmbedOptions
from pipeline.shard_file import ShardReadError
from pipeline.shard_listing import expand_shards
from pipeline.shards import ShardSpec, iter_members
from shard_helpers import members

REPO = Path(__file__).resolve().parents[1]
VAEPIPE = str(Path(sys.executable).parent / "vaepipe")
ONE_ATTEMPT = {"retries": {"max_attempts": 1, "mode": "standard"}}  # botocore gives up at once: fast


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (28, 28), value).save(buf, format="PNG")
    return buf.getvalue()


def tar_bytes(n: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i in range(n):
            data = png(10 * i)
            info = tarfile.TarInfo(f"{i:03d}.png")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def parquet_bytes(n: int) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"image": pa.array([png(i) for i in range(n)], pa.binary())}), buf)
    return buf.getvalue()


def through_proxy(s3_server, fault_proxy, slowdown_every_get: bool) -> dict:
    """Storage options that reach SeaweedFS through the fault proxy, botocore trying once.

    Armed, the proxy answers every object GET with 503 SlowDown (LIST and HEAD pass), more times
    than s3fs retries: the storage layer gives up, as after a long outage."""
    if slowdown_every_get:
        fault_proxy.schedule = {"GET": ("slowdown",)}
        fault_proxy.every, fault_proxy.max_faults = 1, 10 ** 6
    so = s3_server.storage_options
    so["client_kwargs"]["endpoint_url"] = fault_proxy.endpoint_url
    so["config_kwargs"].update(ONE_ATTEMPT)
    return so


def outputs(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) if out.exists() else []


# --------------------------------------------------------------------------- S3: SlowDown past all retries


def test_s3_slowdown_on_every_get_fails_the_shard_and_commits_nothing(s3_server, s3_bucket, fault_proxy,
                                                                      tiny_checkpoint, tmp_path):
    fs = s3_server.filesystem()
    bare = s3_bucket.removeprefix("s3://")
    fs.pipe_file(f"{bare}/tar/shard-000000.tar", tar_bytes(4))
    fs.pipe_file(f"{bare}/pq/shard-000000.parquet", parquet_bytes(3))
    fs.pipe_file(f"{bare}/img/a.png", png(1))
    so = through_proxy(s3_server, fault_proxy, slowdown_every_get=True)
    [tar] = expand_shards(f"{s3_bucket}/tar", so)  # listing is not a GET: it still works
    out = tmp_path / "out"
    embedder = ShardEmbedder(EmbedOptions(tiny_checkpoint, str(out), batch_size=4, storage_options=so))
    with pytest.raises(ShardReadError) as err:
        embedder.process(tar)
    message = str(err.value)
    assert len(message.splitlines()) == 1 and message.startswith(f"{tar.name}: ")
    assert "reduce your request rate" in message or "SlowDown" in message, message
    assert outputs(out) == []  # neither a rows file nor a dead-letter file for the shard
    faults = fault_proxy.log
    assert faults and {(kind, fault) for kind, fault, _, _ in faults} == {("GET", "slowdown")}
    assert all(path.endswith("/tar/shard-000000.tar") for _, _, path, _ in faults)

    # The same for the other readers: Parquet (read through pyarrow) and an image folder.
    for url in (f"{s3_bucket}/pq", f"{s3_bucket}/img"):
        [spec] = expand_shards(url, so)
        with pytest.raises(ShardReadError, match="request rate|SlowDown"):
            list(iter_members(spec, so))


def test_s3_slowdown_embed_command_fails_in_one_line(s3_server, s3_bucket, fault_proxy, tiny_checkpoint,
                                                     tmp_path):
    fs = s3_server.filesystem()
    bare = s3_bucket.removeprefix("s3://")
    for i in range(2):  # two shards: the default local run uses worker processes, whose cause is unwrapped
        fs.pipe_file(f"{bare}/shards/shard-{i:06d}.tar", tar_bytes(3))
    so = through_proxy(s3_server, fault_proxy, slowdown_every_get=True)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "VAEPIPE_DEBUG"}
    proc = subprocess.run([VAEPIPE, "embed", f"{s3_bucket}/shards/", "--checkpoint", tiny_checkpoint,
                           "--out", str(out), "--run-date", "2026-11-28", "--storage-options", json.dumps(so)],
                          env={**env, "OMP_NUM_THREADS": "1"}, cwd=str(REPO), text=True, capture_output=True,
                          timeout=240)
    errors = [line for line in proc.stderr.strip().splitlines() if line.startswith("Error")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == errors[0]
    assert f"{s3_bucket}/shards/shard-00000" in errors[0] and "storage failure" in errors[0], errors[0]
    assert not [f for f in outputs(out) if f.endswith((".parquet", "_SUCCESS"))], outputs(out)


def test_s3_truncated_tar_as_stored_is_still_a_dead_letter(s3_server, s3_bucket, fault_proxy, tiny_checkpoint,
                                                           tmp_path):
    fs = s3_server.filesystem()
    bare = s3_bucket.removeprefix("s3://")
    whole = tar_bytes(5)
    fs.pipe_file(f"{bare}/cut/shard-000000.tar", whole[:1024 * 2 + 100])  # cut inside member 2's header
    so = through_proxy(s3_server, fault_proxy, slowdown_every_get=False)
    [spec] = expand_shards(f"{s3_bucket}/cut", so)
    out = tmp_path / "out"
    embedder = ShardEmbedder(EmbedOptions(tiny_checkpoint, str(out), batch_size=4, storage_options=so))
    summary = embedder.process(spec)
    assert (summary["rows"], summary["errors"], summary["members"]) == (1, 1, 2)
    [errors] = list((out / "errors").glob("*.parquet"))
    dead = pq.read_table(errors).to_pylist()
    assert [(d["error_type"], d["stage"]) for d in dead] == [("TruncatedShard", "read")]
    assert len(list(out.glob("*.parquet"))) == 1


# --------------------------------------------------------------------------- local: gone files, bad bytes


def test_shard_deleted_after_listing_fails_the_run(tiny_checkpoint, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.tar").write_bytes(tar_bytes(3))
    (data / "b.tar").write_bytes(tar_bytes(3))
    specs = expand_shards(str(data))
    (data / "b.tar").unlink()  # vanished between listing and reading
    out = tmp_path / "out"
    embedder = ShardEmbedder(EmbedOptions(tiny_checkpoint, str(out), batch_size=4))
    assert embedder.process(specs[0])["rows"] == 3
    with pytest.raises(ShardReadError, match=r"b\.tar: not found \(storage failure"):
        embedder.process(specs[1])
    assert sorted(p.name for p in out.rglob("*.parquet")) == [embedder.rows_url(specs[0]).rsplit("/", 1)[-1]]


@pytest.mark.parametrize("fmt", ["tar", "parquet", "images"])
def test_file_gone_since_listing(tmp_path, fmt):
    """A whole shard gone fails it (a rerun lists again); one image file of a folder group gone is
    that image's dead letter (tests/test_folder_reader.py), the rest of the group is read."""
    folder = tmp_path / fmt
    folder.mkdir()
    name = {"tar": "s.tar", "parquet": "s.parquet", "images": "a.png"}[fmt]
    (folder / name).write_bytes({"tar": tar_bytes(2), "parquet": parquet_bytes(2), "images": png(1)}[fmt])
    [spec] = expand_shards(str(folder))
    (folder / name).unlink()
    tally = ShardTally()
    if fmt == "images":
        assert [m.error_type for m in iter_members(spec, tally=tally)] == ["FileNotFound"]
        assert tally.members == 1
        return
    with pytest.raises(ShardReadError, match=f"{name}: not found"):
        list(iter_members(spec, tally=tally))


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
