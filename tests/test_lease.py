"""pipeline.lease: one run per output partition, on local disk and on the S3 server; workers
stop when their driver is gone."""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from jobs.cli import cli
from pipeline.lease import LEASE, Lease, LeaseHeldError, RunAbandonedError, check_driver, read_lease, this_process
from pipeline.options import EmbedOptions

REPO = Path(__file__).resolve().parents[1]



@pytest.fixture(params=["local", "s3"])
def partition(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "part"), None
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return f"{bucket}/part", server.storage_options


def test_a_second_run_is_refused_naming_the_holder(partition):
    url, so = partition
    with Lease(url, so) as first:
        held = read_lease(url, so)
        assert held["owner"] == first.owner and held["pid"] == os.getpid()
        with pytest.raises(LeaseHeldError, match=f"pid {os.getpid()} on {socket.gethostname()}"):
            Lease(url, so).acquire()
    assert read_lease(url, so) is None  # released
    with Lease(url, so):  # and free again
        pass


def _write_lease(url, so, **fields):
    from vae_model.storage import atomic_write_bytes, join

    record = {"owner": "someone", "host": "another-host", "boot_id": "x", "pid": 1, "pid_start": "1",
              "acquired_at": "2026-01-01T00:00:00+00:00", "expires_at": time.time() + 600, "ttl_s": 60, **fields}
    atomic_write_bytes(join(url, LEASE), json.dumps(record).encode(), so)


def test_an_expired_lease_is_taken_over(partition):
    url, so = partition
    _write_lease(url, so, expires_at=time.time() - 1)
    with Lease(url, so) as lease:
        assert read_lease(url, so)["owner"] == lease.owner


def test_a_live_lease_of_another_machine_is_respected(partition):
    url, so = partition
    _write_lease(url, so)
    with pytest.raises(LeaseHeldError, match="another-host"):
        Lease(url, so).acquire()


def test_the_lease_of_a_dead_process_on_this_machine_is_taken_over_at_once(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = {**this_process(), "pid": proc.pid, "pid_start": "0"}
    url = str(tmp_path / "part")
    _write_lease(url, None, **dead)
    with Lease(url, None) as lease:
        assert read_lease(url, None)["owner"] == lease.owner


def test_workers_stop_when_the_lease_is_lost_or_the_driver_is_gone(tmp_path):
    url = str(tmp_path / "out")
    with Lease(url, None) as lease:
        opts = EmbedOptions("ck", url, lease_owner=lease.owner, driver=this_process())
        check_driver(opts)  # all is well
        with pytest.raises(RunAbandonedError, match="no longer holds the output lease"):
            check_driver(EmbedOptions("ck", url, lease_owner="another-run"))
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    gone = {**this_process(), "pid": proc.pid}
    with pytest.raises(RunAbandonedError, match=f"driver process \\(pid {proc.pid}\\)"):
        check_driver(EmbedOptions("ck", url, driver=gone), lease=False)


def _shards(tmp_path, n_shards=12, per_shard=25):
    from model_fixtures import FASHION

    from pipeline.shards import write_shards

    shards = tmp_path / "shards"
    write_shards(str(FASHION), str(shards), shard_size=per_shard, limit=n_shards * per_shard)
    return shards


def _start_embed(shards, ckpt, out, *extra):
    cmd = [sys.executable, "-m", "jobs", "embed", str(shards), "--checkpoint", ckpt, "--out", str(out),
           "--batch-size", "16", *extra]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for(predicate, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_two_embed_runs_into_one_partition_at_once(tiny_checkpoint, tmp_path):
    shards = _shards(tmp_path)
    out = tmp_path / "out"
    first = _start_embed(shards, tiny_checkpoint, out)
    try:
        assert _wait_for(lambda: (out / LEASE).exists()), "the first run should take the lease"
        res = CliRunner().invoke(cli, ["embed", str(shards), "--checkpoint", tiny_checkpoint, "--out", str(out)])
        assert res.exit_code == 1
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert len(lines) == 1 and "is being written by another run" in lines[0], res.output
        assert f"pid {first.pid}" in lines[0]
        stdout, stderr = first.communicate(timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 0, stderr[-2000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["totals"]["rows"] == 300 and summary["reconciled"]
    assert not (out / LEASE).exists()


def test_embed_into_a_held_s3_partition_is_refused(s3_server, s3_bucket, tiny_checkpoint, fashion_shards):
    out = f"{s3_bucket}/latents"
    with Lease(out, s3_server.storage_options):
        res = CliRunner().invoke(cli, ["embed", str(fashion_shards), "--checkpoint", tiny_checkpoint, "--out", out,
                                       "--storage-options", s3_server.storage_options_json])
    assert res.exit_code == 1 and "is being written by another run" in res.output, res.output
    fs = s3_server.filesystem()
    assert not [p for p in fs.find(s3_bucket[5:]) if p.endswith(".parquet")]


def test_workers_commit_nothing_after_their_driver_is_killed(tiny_checkpoint, tmp_path):
    shards = _shards(tmp_path, n_shards=8, per_shard=100)
    out = tmp_path / "out"
    # IWAE-32 makes each shard take seconds, so each worker still has shards to do after the kill
    proc = _start_embed(shards, tiny_checkpoint, out, "--score", "iwae", "--iwae-k", "32",
                        "--direct_num_workers=2", "--direct_running_mode=multi_processing")
    try:
        assert _wait_for(lambda: len(list(out.glob("*.parquet"))) >= 1, timeout=180)
        os.kill(proc.pid, signal.SIGKILL)  # the driver only: its worker processes live on
        proc.wait()
        time.sleep(1.0)  # a commit already under way may still land
        settled = sorted(p.name for p in out.glob("*.parquet"))
        time.sleep(12)
        assert sorted(p.name for p in out.glob("*.parquet")) == settled
        assert len(settled) < 8 and not (out / "_SUCCESS").exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
