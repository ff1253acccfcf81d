"""The real-service fixtures in conftest.py work: SeaweedFS S3 (with enforced auth) and Dask."""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- S3

def test_s3_roundtrip(s3_server, s3_bucket):
    from fsspec.core import url_to_fs

    fs, _ = url_to_fs(s3_bucket, **s3_server.storage_options)
    url = f"{s3_bucket}/shards/part-0000.bin"
    payload = os.urandom(64 * 1024) + b"vaepipe"
    with fs.open(url, "wb") as f:
        f.write(payload)

    # Read through a second, uncached instance so the data really comes from the server.
    reader = s3_server.filesystem()
    assert reader.cat(url) == payload
    assert reader.ls(f"{s3_bucket}/shards") == [f"{s3_bucket[len('s3://'):]}/shards/part-0000.bin"]
    assert reader.info(url)["size"] == len(payload)


def test_s3_wrong_secret_is_refused(s3_server, s3_bucket):
    good = s3_server.filesystem()
    good.pipe(f"{s3_bucket}/secret.txt", b"top secret")

    bad = s3_server.filesystem(secret=s3_server.secret_key + "-wrong")
    with pytest.raises(PermissionError, match=r"(?i)signature|access denied|forbidden"):
        bad.ls(s3_bucket)
    with pytest.raises(PermissionError):
        bad.cat(f"{s3_bucket}/secret.txt")

    anon = s3_server.filesystem(anon=True, key=None, secret=None)
    with pytest.raises(PermissionError):
        anon.cat(f"{s3_bucket}/secret.txt")


def test_s3_missing_bucket_is_not_found(s3_server):
    fs = s3_server.filesystem()
    missing = f"s3://no-such-bucket-{uuid.uuid4().hex[:12]}"
    with pytest.raises(FileNotFoundError):
        fs.cat(f"{missing}/some/key.bin")
    with pytest.raises(FileNotFoundError):
        fs.ls(missing)


def test_s3_env_is_complete(s3_server):
    env = s3_server.env
    assert env["AWS_ENDPOINT_URL"] == s3_server.endpoint_url
    assert env["AWS_ACCESS_KEY_ID"] == s3_server.access_key
    assert env["AWS_SECRET_ACCESS_KEY"] == s3_server.secret_key
    assert env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert json.loads(s3_server.storage_options_json) == s3_server.storage_options


# --------------------------------------------------------------------------- Dask

def test_dask_cluster_uses_two_worker_processes(dask_cluster):
    from distributed import Client

    with Client(dask_cluster, timeout="30s") as client:
        workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
        assert len(workers) == 2
        futures = [client.submit(os.getpid, pure=False, workers=[w], allow_other_workers=False)
                   for w in workers]
        pids = client.gather(futures)
        paths = client.run(lambda: __import__("sys").path)

    assert len(set(pids)) == 2, pids
    assert os.getpid() not in pids
    for worker, path in paths.items():
        assert str(REPO_ROOT) in path, f"{worker} cannot import the project: sys.path={path}"


def test_beam_pipeline_on_dask_runner(dask_cluster, tmp_path, record_property):
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    out_dir = str(tmp_path)

    # Defined locally so Beam/cloudpickle ship it by value: workers need not import this module.
    class RecordToFile(beam.DoFn):
        def __init__(self, directory):
            self.directory = directory

        def process(self, element):
            import json as _json
            import os as _os
            import uuid as _uuid

            path = _os.path.join(self.directory, f"{_uuid.uuid4().hex}.json")
            with open(path, "w") as f:
                _json.dump({"value": element, "pid": _os.getpid()}, f)
            yield element

    options = PipelineOptions([
        "--runner=apache_beam.runners.dask.dask_runner.DaskRunner",
        f"--dask_client_address={dask_cluster}",
        # One bag partition per element, to give Dask the chance to use both workers
        # (the default partition size, 128, puts all three elements in one partition).
        "--dask_npartitions=3",
    ])
    pipeline = beam.Pipeline(options=options)
    _ = (pipeline
         | beam.Create([1, 2, 3])
         | beam.Map(lambda x: x * 2)
         | beam.ParDo(RecordToFile(out_dir)))
    result = pipeline.run()
    try:
        result.wait_until_finish(duration=120_000)
    finally:
        result.client.close()

    records = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*.json"))]
    assert sorted(r["value"] for r in records) == [2, 4, 6]
    pids = sorted({r["pid"] for r in records})
    assert os.getpid() not in pids  # ran on the cluster, not in-process
    # Spreading over both workers is up to Dask's scheduler: report it, don't assert it.
    record_property("beam_worker_pids", pids)
    print(f"Beam DaskRunner used {len(pids)} worker process(es): {pids}")
