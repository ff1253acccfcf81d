"""Observability: Beam metrics (pipeline.metrics) in the manifest and at the end of embed, the
JSON log format (jobs.log_format) and embed's progress display (jobs.embed_progress)."""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.embed_progress import EmbedProgress
from jobs.log_format import JsonFormatter
from pipeline.manifest import read_manifest
from pipeline.metrics import format_metrics
from pipeline.options import EmbedOptions
from pipeline.progress import Progress
from pipeline.run import run_embed

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def with_dead_letters(fashion_shards, tmp_path_factory) -> Path:
    """Two real shards of 200 Fashion images and one tar of 2 images, the second one truncated."""
    folder = tmp_path_factory.mktemp("metrics") / "shards"
    folder.mkdir()
    for shard in sorted(Path(fashion_shards).glob("*.tar"))[:2]:
        shutil.copy(shard, folder / shard.name)
    good = io.BytesIO()
    from PIL import Image

    Image.new("L", (28, 28), 128).save(good, "PNG")
    with tarfile.open(folder / "broken.tar", "w") as tf:
        for name, data in (("a.png", good.getvalue()), ("b.png", good.getvalue()[:40])):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return folder


def test_metrics_from_the_dofns_reach_the_manifest(with_dead_letters, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    m = run_embed(str(with_dead_letters), EmbedOptions(tiny_checkpoint, str(out)))
    metrics = m["metrics"]
    assert metrics["available"] and metrics == read_manifest(str(out))["metrics"]  # stored, not only returned
    c = metrics["counters"]
    errors = pq.read_table(next((out / "errors").glob("*.parquet"))).to_pylist()
    assert len(errors) == 1
    assert c["images_seen"] == 402 and c["rows"] == 401 and c["errors"] == 1 and c["shards"] == 3
    assert c[f"dead_letters.{errors[0]['error_type']}"] == 1
    assert c["bytes_read"] == sum(s["bytes_read"] for s in m["shards"]) > 400 * 100
    d = metrics["distributions"]
    assert d["shard_images"] == {"count": 3, "sum": 402, "min": 2, "max": 200, "mean": 134.0}
    for name in ("shard_decode_ms", "shard_score_ms", "shard_ms"):
        assert d[name]["count"] == 3 and d[name]["max"] >= d[name]["mean"] >= d[name]["min"] >= 0
    assert d["shard_ms"]["sum"] >= d["shard_score_ms"]["sum"]
    text = format_metrics(metrics)
    assert "rows = 401" in text and "shard_score_ms: n=3" in text

    again = run_embed(str(with_dead_letters), EmbedOptions(tiny_checkpoint, str(out)))  # every shard skipped
    assert again["metrics"]["counters"]["shards_skipped"] == 3
    assert "shard_score_ms" not in again["metrics"]["distributions"]  # skipped shards are counted, not timed


def test_a_runner_without_metrics_says_so(dask_cluster, mnist_shards, tiny_checkpoint, tmp_path):
    """Beam's DaskRunner result has no metrics (NotImplementedError): the manifest says so."""
    m = run_embed(str(mnist_shards), EmbedOptions(tiny_checkpoint, str(tmp_path / "out"), torch_threads=1),
                  ["--runner=apache_beam.runners.dask.dask_runner.DaskRunner",
                   f"--dask_client_address={dask_cluster}"])
    assert m["metrics"]["available"] is False and "NotImplementedError" in m["metrics"]["reason"]
    assert m["totals"]["rows"] == 100 and "metrics: none (" in format_metrics(m["metrics"])


def test_json_formatter_writes_one_object_a_line():
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        record = logging.getLogger("pipeline.x").makeRecord("pipeline.x", logging.WARNING, __file__, 1,
                                                            "shard %s failed", ("s1",), sys.exc_info(),
                                                            extra={"rows": 3})
    line = JsonFormatter().format(record)
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["level"] == "WARNING" and obj["logger"] == "pipeline.x" and obj["message"] == "shard s1 failed"
    assert obj["rows"] == 3 and "ValueError" in obj["exc"] and obj["ts"].endswith("+00:00")


def test_embed_with_json_logs_writes_only_json_lines(mnist_shards, tiny_checkpoint, tmp_path):
    """In one process (--direct_num_workers=1): worker processes of the multi-process DirectRunner
    write their own start-up lines to stderr in Beam's format (README, "Scheduling")."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "jobs", "--log-format", "json", "embed", str(mnist_shards),
                           "--checkpoint", tiny_checkpoint, "--out", str(tmp_path / "out"), "--no-report",
                           "--direct_num_workers=1"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stderr.splitlines() if line.strip()]  # each one parses
    done = [x for x in lines if x["message"] == "embed finished"]
    assert len(done) == 1 and done[0]["metrics"]["counters"]["rows"] == 100 and "verdict" in done[0]["drift"]
    assert json.loads(proc.stdout)["totals"]["rows"] == 100


def test_progress_is_a_bar_on_a_terminal_and_log_lines_otherwise(caplog):
    stream = io.StringIO()
    with EmbedProgress(stream, interactive=True) as show:
        show(Progress(1, 3, 200, 2.0))
        show(Progress(3, 3, 600, 4.0))
    text = stream.getvalue()
    assert "embed" in text and "3/3" in text and "600 images" in text
    plain = EmbedProgress(io.StringIO())  # not a terminal
    assert not plain.interactive
    with caplog.at_level(logging.INFO, logger="pipeline.progress"):
        plain(Progress(1, 3, 200, 2.0))
    assert "shards 1/3, 200 images, 100 img/s" in caplog.text and plain.bar is None
