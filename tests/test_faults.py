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
import threading
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


def _embed(data_url: str, checkpoint_url: str, out_url: str, storage_options: str, *extra: str) -> subprocess.Popen:
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
    cut_tars = sorted(path for kind, fault, path, _ in fault_proxy.log if fault == "drop_mid" and path.endswith(".tar"))
    assert cut_tars == [f"/{_bare(s3_bucket)}/shards/shard-{i:06d}.tar" for i in range(3)], fault_proxy.log
    assert all(rng.startswith("bytes=") for kind, _, path, rng in fault_proxy.log if kind == "GET" and path in cut_tars)

    fs.invalidate_cache()
    assert fs.exists(f"{_bare(s3_bucket)}/faulty/dt={RUN_DATE}/_SUCCESS")
    assert not fs.exists(f"{_bare(s3_bucket)}/faulty/errors")  # no dead letters from storage hiccups
    _assert_same_rows(_rows(f"{_bare(s3_bucket)}/faulty/dt={RUN_DATE}", fs),
                      _rows(f"{_bare(s3_bucket)}/clean/dt={RUN_DATE}", fs))
