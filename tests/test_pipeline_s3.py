"""The pipeline and the jobs against real S3 (SeaweedFS through s3fs): nothing is mocked.

Shards, checkpoint and Parquet output all live in a bucket; the rows must equal a local run
on the same images. CLI failures (missing bucket, wrong secret, no shards) must be one line
on stderr and leave the output prefix untouched.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet  # noqa: F401  (pa.parquet)
import pytest
from click.testing import CliRunner

from jobs.cli import cli
from pipeline.options import EmbedOptions
from pipeline.run import run_embed
from pipeline.shards import write_shards
from vae_model.checkpoint import load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
FASHION = REPO / "data" / "demo" / "fashion-mnist-2k-images-idx3-ubyte.gz"
VAEPIPE = str(Path(sys.executable).parent / "vaepipe")
RUN_DATE = "2026-11-28"
SCALARS = ("elbo", "recon_nll", "kl", "bits_per_dim", "anomaly_score", "anomaly_percentile")


def _bare(url: str) -> str:
    return url.removeprefix("s3://")


def _comparable(table: pa.Table, data_root: str) -> dict:
    """Rows sorted by key, keyed relative to the data root (local and S3 shard URLs differ)."""
    d = table.sort_by("key").to_pydict()
    assert all(k.startswith(data_root + "/") for k in d["key"]), d["key"][:2]
    d["key"] = [k[len(data_root) + 1:] for k in d["key"]]
    return d


def _env(overrides: dict[str, str]) -> dict[str, str]:
    """This environment without any AWS_* of the caller, plus the server's credentials."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "VAEPIPE_DEBUG"}
    return {**env, **overrides}


def _vaepipe(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start the console script; credentials reach it through the environment only."""
    return subprocess.Popen([VAEPIPE, *args], env=_env(env), cwd=str(REPO), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def s3_run(s3_server, fashion_shards, tiny_checkpoint, tmp_path_factory):
    """One embedding run S3 -> S3 and the same run on local disk; both read back."""
    import s3fs
    import torch

    so = s3_server.storage_options
    threads = torch.get_num_threads()  # torch_threads=1 below sets it process-wide
    bucket = f"s3://test-{uuid.uuid4().hex[:16]}"
    s3_server.filesystem().mkdir(_bare(bucket))
    try:
        shards_url = f"{bucket}/shards"
        urls = write_shards(str(FASHION), shards_url, fmt="tar", shard_size=200, limit=600, storage_options=so)
        ckpt = load_checkpoint(tiny_checkpoint)
        ckpt_url = f"{bucket}/models/tiny.safetensors"
        saved_id = save_checkpoint(ckpt.model, ckpt_url, ckpt.meta, so)
        loaded_id = load_checkpoint(ckpt_url, so).model_id
        manifest = run_embed(f"{shards_url}/*.tar", EmbedOptions(ckpt_url, f"{bucket}/out/", batch_size=64,
                                                                 run_date=RUN_DATE, torch_threads=1,
                                                                 storage_options=so))
        local_out = tmp_path_factory.mktemp("local-run")
        local = run_embed(str(fashion_shards), EmbedOptions(tiny_checkpoint, str(local_out), batch_size=64,
                                                            run_date=RUN_DATE, torch_threads=1))
        local_table = pads.dataset(str(local_out / f"dt={RUN_DATE}"), format="parquet").to_table()
        yield dict(bucket=bucket, shards_url=shards_url, urls=urls, model_id=ckpt.model_id, saved_id=saved_id,
                   loaded_id=loaded_id, manifest=manifest, local=local,
                   want=_comparable(local_table, str(fashion_shards)))
    finally:
        torch.set_num_threads(threads)
        s3fs.S3FileSystem.clear_instance_cache()
        s3_server.filesystem().rm(_bare(bucket), recursive=True)


def test_embed_s3_to_s3_matches_local_run(s3_server, s3_run):
    bucket, manifest, urls, want = s3_run["bucket"], s3_run["manifest"], s3_run["urls"], s3_run["want"]
    assert len(urls) == 3
    assert s3_run["saved_id"] == s3_run["loaded_id"] == s3_run["model_id"]  # checkpoint round trip via s3://
    assert manifest["reconciled"] and manifest["totals"] == s3_run["local"]["totals"] == {
        "images_seen": 600, "rows": 600, "errors": 0, "shards": 3, "shards_skipped": 0}
    assert manifest["partition_url"] == f"{bucket}/out/dt={RUN_DATE}"
    assert manifest["inputs"] == urls and manifest["model_id"] == s3_run["model_id"]

    fs = s3_server.filesystem()  # fresh instance: sees what the pipeline wrote
    part = f"{_bare(bucket)}/out/dt={RUN_DATE}"
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(part))
    assert names[:3] == ["_SUCCESS", "_manifest.json", "_report.html"] and len(names) == 6, names
    assert all(n.startswith("shard-") and n.endswith(".parquet") for n in names[3:])
    report = fs.cat(f"{part}/_report.html").decode()  # written to the bucket by the driver (pipeline.report)
    assert s3_run["model_id"] in report and report.count('src="data:image/png') == 4 + 64 + 16  # thumbnails read back from S3
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(f"{_bare(bucket)}/out")] == [f"dt={RUN_DATE}"]  # no errors/, probes
    manifest_text = fs.cat(f"{part}/_manifest.json").decode()
    assert json.loads(manifest_text)["totals"] == manifest["totals"]
    assert s3_server.secret_key not in manifest_text  # credentials never land in the output

    table = pads.dataset(part, filesystem=fs, format="parquet").to_table()  # skips _manifest.json, _SUCCESS
    assert table.num_rows == 600
    assert set(table.column("shard").to_pylist()) == set(urls)
    got = _comparable(table, s3_run["shards_url"])
    assert got["key"] == want["key"]
    for col in ("index", "label", "meta", "model_id", "run_date"):
        assert got[col] == want[col], col
    # The posterior mean and the KL need no noise: identical wherever the shards are stored.
    np.testing.assert_allclose(np.array(got["embedding"]), np.array(want["embedding"]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(got["kl"], want["kl"], atol=1e-4, rtol=0)

    # DuckDB reads s3:// natively only through its httpfs extension, which it must download
    # (no network here); its fsspec bridge reads the same objects through s3fs instead.
    import duckdb

    con = duckdb.connect()
    con.register_filesystem(s3_server.filesystem())
    [(n, labels, mean_kl)] = con.sql(f"SELECT count(*), count(DISTINCT label), avg(kl) "
                                     f"FROM read_parquet('{bucket}/out/dt={RUN_DATE}/*.parquet')").fetchall()
    assert (n, labels) == (600, 10)
    assert mean_kl == pytest.approx(float(np.mean(want["kl"])), abs=1e-6)


def test_scores_do_not_depend_on_where_shards_are_stored(s3_server, s3_run):
    fs = s3_server.filesystem()
    table = pads.dataset(f"{_bare(s3_run['bucket'])}/out/dt={RUN_DATE}", filesystem=fs, format="parquet").to_table()
    got, want = _comparable(table, s3_run["shards_url"]), s3_run["want"]
    assert got["is_anomaly"] == want["is_anomaly"]
    for col in SCALARS:
        np.testing.assert_allclose(np.array(got[col], float), np.array(want[col], float), atol=1e-4, rtol=0,
                                   err_msg=col)


def test_reads_what_another_process_wrote_after_this_one_listed(s3_server, s3_bucket):
    """The driver lists the output folder (progress) while workers write; s3fs answers open/exists
    from that cached listing, so the manifest a worker wrote once read as missing (a whole run
    then failed after every shard was done)."""
    from pipeline.manifest import MANIFEST, SUCCESS, clear_success, read_manifest
    from pipeline.writer import read_metadata
    from vae_model.storage import get_fs

    so = s3_server.storage_options
    part = f"{s3_bucket}/out"
    other = s3_server.filesystem()  # stands for a worker process: its own client, no shared cache
    other.pipe_file(f"{_bare(part)}/{SUCCESS}", b"")
    fs, path = get_fs(part, so)
    assert [e.rsplit("/", 1)[-1] for e in fs.ls(path)] == [SUCCESS]  # listing now cached here
    table = pa.table({"x": [1, 2]}).replace_schema_metadata({"vaepipe.counts": "{}"})
    with other.open(f"{_bare(part)}/shard.parquet", "wb") as f:
        pa.parquet.write_table(table, f)
    other.pipe_file(f"{_bare(part)}/{MANIFEST}", json.dumps({"totals": {"rows": 2}}).encode())

    assert read_manifest(part, so) == {"totals": {"rows": 2}}
    assert read_metadata(f"{part}/shard.parquet", so)["vaepipe.counts"] == "{}"
    fs.ls(path)  # cached again, now with _SUCCESS in it
    other.rm(f"{_bare(part)}/{SUCCESS}")
    other.pipe_file(f"{_bare(part)}/{SUCCESS}", b"")  # rewritten by another run
    clear_success(part, so)
    other.invalidate_cache()
    assert not other.exists(f"{_bare(part)}/{SUCCESS}")


def test_train_from_s3_to_s3_with_env_credentials(s3_server, s3_bucket):
    so = s3_server.storage_options
    write_shards(str(FASHION), f"{s3_bucket}/train", fmt="tar", shard_size=100, limit=200, storage_options=so)
    model_url = f"{s3_bucket}/runs/m.safetensors"
    proc = _vaepipe(["train", f"{s3_bucket}/train/", "--out", model_url, "--epochs", "1", "--batch-size", "32",
                     "--latent-dim", "4", "--widths", "8,16", "--hidden-dim", "32", "--kl-warmup-steps", "0",
                     "--val-fraction", "0.2", "--num-workers", "0", "--quiet"],
                    {**s3_server.env, "OMP_NUM_THREADS": "1"})  # tiny model: 1 thread is fastest on a busy box
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["checkpoint"] == model_url and summary["epochs"] == 1

    ckpt = load_checkpoint(model_url, so)
    assert ckpt.model_id == summary["model_id"] and ckpt.config.latent_dim == 4
    fs = s3_server.filesystem()
    assert fs.exists(f"{_bare(model_url)}.metrics.jsonl") and fs.exists(f"{_bare(model_url)}.resume.pt")

    info = CliRunner().invoke(cli, ["info", model_url, "--storage-options", s3_server.storage_options_json])
    assert info.exit_code == 0, info.output
    shown = json.loads(info.output)
    assert shown["model_id"] == ckpt.model_id and shown["config"]["widths"] == [8, 16]


def test_embed_cli_storage_errors_are_one_line_and_write_nothing(s3_server, s3_bucket, tiny_checkpoint):
    fs = s3_server.filesystem()
    bucket = _bare(s3_bucket)
    fs.pipe(f"{bucket}/shards/shard-000000.tar", b"never read")
    missing = f"s3://no-such-bucket-{uuid.uuid4().hex[:12]}"
    good, bad = s3_server.secret_key, s3_server.secret_key + "-wrong"
    cases = {  # name: (data URL, secret key in the environment, what the one line must say)
        "missing_bucket": (f"{missing}/shards/*.tar", good, f"{missing}/shards/*.tar: the bucket does not exist"),
        "wrong_secret": (f"{s3_bucket}/shards/", bad, f"{s3_bucket}/shards/: access denied: check credentials"),
        "no_shards": (f"{s3_bucket}/nothing-here/", good, f"no shards matched URL: {s3_bucket}/nothing-here/"),
    }
    # Concurrently: each run is mostly interpreter start-up and imports.
    procs = {name: _vaepipe(["embed", data_url, "--checkpoint", tiny_checkpoint, "--out", f"{s3_bucket}/out-{name}/",
                             "--run-date", RUN_DATE], {**s3_server.env, "AWS_SECRET_ACCESS_KEY": secret})
             for name, (data_url, secret, _) in cases.items()}
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=120)
        lines = stderr.strip().splitlines()
        assert proc.returncode != 0, name
        assert len(lines) == 1 and lines[0].startswith("Error: "), (name, stderr)
        assert cases[name][2] in lines[0], (name, lines[0])
    fs.invalidate_cache()
    assert fs.find(bucket) == [f"{bucket}/shards/shard-000000.tar"]  # no output, no write probe, no _SUCCESS
