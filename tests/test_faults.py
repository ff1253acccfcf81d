"""Faults that CI exercises, with real services only: S3 going away mid-run, transient S3 errors
(503 SlowDown, dropped connections) between vaepipe and SeaweedFS, and a Dask worker killed mid-run.

In every case the result must be what an undisturbed run gives: the same rows, each exactly once,
or a one-line failure that leaves no ``_SUCCESS`` and that a rerun repairs.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest

from vae_model.storage import S3_MAX_ATTEMPTS

REPO = Path(__file__).resolve().parents[1]
VAEPIPE = str(Path(sys.executable).parent / "vaepipe")
RUN_DATE = "2026-11-28"
DASK = "--runner=apache_beam.runners.dask.dask_runner.DaskRunner"
# key + embedding + scores: what must not change when a run is disturbed
COMPARED = ("key", "embedding", "elbo", "recon_nll", "kl", "bits_per_dim", "anomaly_score", "anomaly_percentile",
            "is_anomaly")


def _bare(url: str) -> str:
    return url.removeprefix("s3://")


def _upload_inputs(fs, bucket: str, shards: Path, checkpoint: str) -> tuple[str, str]:
    """Copy the local shards and checkpoint into the bucket; returns (shards URL, checkpoint URL)."""
    for tar in sorted(shards.glob("*.tar")):
        fs.put_file(str(tar), f"{_bare(bucket)}/shards/{tar.name}")
    fs.put_file(checkpoint, f"{_bare(bucket)}/models/tiny.safetensors")
    return f"{bucket}/shards/", f"{bucket}/models/tiny.safetensors"


def _storage_options(server, endpoint_url: str | None = None) -> str:
    so = server.storage_options
    if endpoint_url is not None:
        so["client_kwargs"]["endpoint_url"] = endpoint_url
    return json.dumps(so)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "VAEPIPE_DEBUG"}
    return {**env, "OMP_NUM_THREADS": "1"}


def _embed(data_url: str, checkpoint_url: str, out_url: str, storage_options: str = "{}", *extra: str) -> subprocess.Popen:
    """Start ``vaepipe embed`` (the console script, with its default local worker processes)."""
    return subprocess.Popen([VAEPIPE, "embed", data_url, "--checkpoint", checkpoint_url, "--out", out_url,
                             "--run-date", RUN_DATE, "--batch-size", "64", "--storage-options", storage_options,
                             *extra], env=_env(), cwd=str(REPO), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"vaepipe embed still running after {timeout:.0f}s: it must fail or finish, not hang\n{err}")
    return proc.returncode, out, err


def _rows(part: str, fs=None) -> dict:
    """The compared columns, sorted by key; keys made relative to the shard folder."""
    table = pads.dataset(part, filesystem=fs, format="parquet").to_table(columns=list(COMPARED)).sort_by("key")
    rows = table.to_pydict()
    rows["key"] = [k.rsplit("/shards/", 1)[-1] for k in rows["key"]]
    return rows


def _assert_same_rows(got: dict, want: dict, n: int = 600) -> None:
    assert len(got["key"]) == n and len(set(got["key"])) == n and got["key"] == want["key"]
    assert got["is_anomaly"] == want["is_anomaly"]
    # The same shards, model and flags on the same machine: equal to the last bit.
    for col in COMPARED[1:-1]:
        np.testing.assert_array_equal(np.array(got[col], float), np.array(want[col], float), err_msg=col)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.strip().splitlines() if line.startswith("Error")]


# --------------------------------------------------------------------------- transient S3 errors

def test_embed_survives_injected_s3_faults(s3_server, s3_bucket, fault_proxy, fashion_shards, tiny_checkpoint):
    """503 SlowDown and dropped connections (before and in the middle of responses, including the
    ranged GET that streams a tar shard) on GET, LIST, PUT and HEAD: the run succeeds through
    vaepipe's retry policy, and its rows equal those of a run without faults."""
    fs = s3_server.filesystem()
    data_url, ckpt_url = _upload_inputs(fs, s3_bucket, fashion_shards, tiny_checkpoint)

    clean = _embed(data_url, ckpt_url, f"{s3_bucket}/clean/", _storage_options(s3_server))
    rc, _, err = _finish(clean)
    assert rc == 0, err

    # Every 3rd request of each kind fails, up to 4 faults per kind (16 in all): fewer in a row
    # than the S3_MAX_ATTEMPTS botocore makes, so a retrying client must get through. And the GET
    # that streams each tar shard is cut off halfway through its body, once per shard.
    fault_proxy.every, fault_proxy.max_faults, fault_proxy.cut_first_get_of = 3, 4, (".tar",)
    assert fault_proxy.max_faults < S3_MAX_ATTEMPTS * 3
    faulty = _embed(data_url, ckpt_url, f"{s3_bucket}/faulty/", _storage_options(s3_server, fault_proxy.endpoint_url))
    rc, out, err = _finish(faulty)
    assert rc == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["reconciled"] and summary["totals"]["rows"] == 600 and summary["totals"]["errors"] == 0

    injected = dict(fault_proxy.injected)
    by_kind = fault_proxy.faults_by_kind()
    assert set(by_kind) == {"GET", "LIST", "PUT", "HEAD"}, (injected, dict(fault_proxy.requests))
    assert {fault for _, fault in injected} == {"slowdown", "drop_before", "drop_mid"}, injected
    # distinct tars: a periodic GET fault (drop_mid comes first in GET's cycle) may cut a tar's retried GET again
    cut_tars = sorted({path for kind, fault, path, _ in fault_proxy.log if fault == "drop_mid" and path.endswith(".tar")})
    assert cut_tars == [f"/{_bare(s3_bucket)}/shards/shard-{i:06d}.tar" for i in range(3)], fault_proxy.log
    assert all(rng.startswith("bytes=") for kind, _, path, rng in fault_proxy.log if kind == "GET" and path in cut_tars)

    fs.invalidate_cache()
    assert fs.exists(f"{_bare(s3_bucket)}/faulty/dt={RUN_DATE}/_SUCCESS")
    assert not fs.exists(f"{_bare(s3_bucket)}/faulty/errors")  # no dead letters from storage hiccups
    _assert_same_rows(_rows(f"{_bare(s3_bucket)}/faulty/dt={RUN_DATE}", fs),
                      _rows(f"{_bare(s3_bucket)}/clean/dt={RUN_DATE}", fs))


# --------------------------------------------------------------------------- S3 down mid-run

def _outputs(fs, part: str) -> list[str]:
    fs.invalidate_cache()
    try:
        return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(part) if p.endswith(".parquet"))
    except FileNotFoundError:
        return []


def test_s3_outage_mid_run_fails_in_one_line_and_rerun_matches(restartable_s3, tiny_checkpoint, tmp_path):
    """SeaweedFS is stopped once the first shard is committed: the run fails within its retry
    bounds with one ``Error:`` line and no ``_SUCCESS``; after a restart (same data, same ports)
    the rerun skips the shards that were committed and its rows equal an undisturbed run's."""
    from pipeline.options import EmbedOptions
    from pipeline.run import run_embed
    from pipeline.shards import write_shards

    server = restartable_s3.server
    so = server.storage_options
    fs = server.filesystem()
    fs.mkdir("outage")
    # The 600 images of fashion_shards, in 12 shards: the outage lands while most are still to do.
    source = str(REPO / "data/demo/fashion-mnist-2k-images-idx3-ubyte.gz")
    shards = write_shards(source, "s3://outage/shards", fmt="tar", shard_size=50, limit=600, storage_options=so)
    fs.put_file(tiny_checkpoint, "outage/models/tiny.safetensors")
    data_url, ckpt_url = "s3://outage/shards/", "s3://outage/models/tiny.safetensors"
    # The undisturbed run: the same shards on local disk, scored in this process with the one torch
    # thread that each of the command's two worker processes gets on this 2-core box.
    local = tmp_path / "shards"
    write_shards(source, str(local), fmt="tar", shard_size=50, limit=600)
    run_embed(str(local), EmbedOptions(tiny_checkpoint, str(tmp_path / "clean"), batch_size=64, run_date=RUN_DATE,
                                       torch_threads=1))
    want = _rows(str(tmp_path / "clean" / f"dt={RUN_DATE}"))

    # The user's retry setting replaces vaepipe's (storage module docstring): 3 attempts, so each
    # request to the stopped server gives up after at most 1 + 2 s of backoff.
    so["config_kwargs"]["retries"] = {"max_attempts": 3, "mode": "standard"}
    so_json = json.dumps(so)
    part = f"outage/out/dt={RUN_DATE}"
    t0 = time.monotonic()
    proc = _embed(data_url, ckpt_url, "s3://outage/out/", so_json)
    while not _outputs(fs, part):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() - t0 < 240, "no shard committed within 240 s"
        time.sleep(0.05)
    restartable_s3.stop()
    stopped = time.monotonic()
    rc, _, err = _finish(proc, timeout=120)
    failed_after = time.monotonic() - stopped
    lines = _error_lines(err)
    assert rc != 0 and len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err[-3000:]
    assert server.endpoint_url.removeprefix("http://") in lines[0], lines[0]  # names the unreachable endpoint
    assert failed_after < 60, failed_after

    restartable_s3.start()
    assert restartable_s3.starts == 2
    fs = server.filesystem()
    done = _outputs(fs, part)
    assert 1 <= len(done) < len(shards), done
    assert not fs.exists(f"{part}/_SUCCESS")

    rc, out, err = _finish(_embed(data_url, ckpt_url, "s3://outage/out/", so_json))
    assert rc == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["reconciled"] and summary["totals"]["rows"] == 600
    assert summary["totals"]["shards"] == len(shards) and summary["totals"]["shards_skipped"] >= len(done)
    fs.invalidate_cache()
    assert fs.exists(f"{part}/_SUCCESS")
    _assert_same_rows(_rows(part, fs), want)
    print(f"outage: {len(done)}/{len(shards)} shards committed before it; the run failed "
          f"{failed_after:.1f}s after the stop: {lines[0]}")


# --------------------------------------------------------------------------- a Dask worker killed mid-run

def _writing_a_shard(pids: set[int], part: Path) -> tuple[int, str] | None:
    """(pid, temp file) of a worker process that holds a shard's output temp file open, if any."""
    for pid in sorted(pids):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(str(part)) and ".tmp-" in target:
                return pid, target.rsplit("/", 1)[-1]
    return None


def test_dask_worker_killed_mid_shard_every_row_once(private_dask_cluster, fashion_shards, tiny_checkpoint, tmp_path):
    """SIGKILL one Dask worker process (not its nanny) while it is writing a shard's rows: the
    scheduler reruns its work elsewhere, and the job completes with each image's row exactly once."""
    from distributed import Client

    out = tmp_path / "out"
    part = out / f"dt={RUN_DATE}"
    nanny_pids = {p.pid for p in private_dask_cluster.nannies}
    with Client(private_dask_cluster.address, timeout="30s") as client:
        before = set(client.run(os.getpid).values())
        assert len(before) == 2 and not before & nanny_pids
        proc = _embed(str(fashion_shards), tiny_checkpoint, str(out), "{}", DASK,
                      f"--dask_client_address={private_dask_cluster.address}")
        t0 = time.monotonic()
        while (victim := _writing_a_shard(before, part)) is None:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() - t0 < 240, "no worker started a shard within 240 s"  # slow start-up on a loaded box
            time.sleep(0.01)
        pid, temp_file = victim
        os.kill(pid, signal.SIGKILL)  # the worker process itself: its nanny stays and starts a new one
        killed_at = time.monotonic() - t0
        committed = sorted(f.name for f in part.iterdir() if f.suffix == ".parquet")
        rc, outtext, err = _finish(proc, timeout=150)
        assert rc == 0, err[-5000:]
        client.wait_for_workers(2, timeout=60)
        after = set(client.run(os.getpid).values())
    assert pid not in after and len(after) == 2 and all(p.poll() is None for p in private_dask_cluster.nannies)

    summary = json.loads(outtext.strip().splitlines()[-1])
    assert summary["reconciled"] and summary["runner"].endswith("DaskRunner")
    assert summary["totals"]["rows"] == 600 and summary["totals"]["errors"] == 0 and summary["totals"]["shards"] == 3
    manifest = json.loads((part / "_manifest.json").read_text())
    assert sorted(s["shard"] for s in manifest["shards"]) == sorted(manifest["inputs"])  # one summary per shard
    assert pid not in {s["pid"] for s in manifest["shards"]}  # the killed worker's shard was redone elsewhere
    assert (part / "_SUCCESS").exists()
    # The killed process could not remove its temp file; the manifest step deletes such leftovers
    # before it writes _SUCCESS (pipeline.manifest.write_manifest).
    assert not [f.name for f in part.iterdir() if ".tmp-" in f.name]
    keys = pads.dataset(str(part), format="parquet").to_table(columns=["key"]).column("key").to_pylist()
    assert len(keys) == 600 and len(set(keys)) == 600
    print(f"dask: killed worker {pid} {killed_at:.1f}s into the run while it wrote {temp_file} "
          f"({len(committed)} shard(s) committed then); summaries (pid, skipped): "
          f"{[(s['pid'], s.get('skipped')) for s in manifest['shards']]}")
