"""What a run report shows, read back from a finished partition: manifest, rows, dead letters,
the checkpoint's validation quantiles, and the headline numbers computed from them.

Torch-free (the Beam driver writes the report): the checkpoint is read with
:func:`vae_model.checkpoint_header.inspect_checkpoint`. Only the columns the report needs are
read from the rows files, so the embeddings never leave storage.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.manifest import MANIFEST, read_manifest
from pipeline.partition import data_files
from pipeline.writer import read_parquet
from vae_model.errors import ConfigError
from vae_model.storage import StorageOptions, get_fs, join

log = logging.getLogger(__name__)

# Read for every row; the key and label only for the rows shown (:func:`row_details`): a night of
# millions of rows costs its numbers and a dictionary of shard names, not its keys.
ROW_FIELDS = ("shard", "index", "anomaly_score", "anomaly_percentile", "is_anomaly")
DETAIL_FIELDS = ("key", "label")
ERROR_FIELDS = ("key", "shard", "index", "stage", "error_type", "message")
Z95 = 1.959963984540054  # two-sided 95% normal quantile


@dataclass
class RunData:
    """One partition as the report sees it."""

    partition_url: str
    manifest: dict[str, Any]
    rows: pa.Table  # ROW_FIELDS, then _file and _row: where the row is (row_details reads its key there)
    errors: pa.Table  # ERROR_FIELDS
    files: list[str] = field(default_factory=list)  # the rows files' URLs
    validation: dict[str, float] | None = None  # the checkpoint's quantile table of the run's score
    image_shape: tuple[int, int] = (3, 64)  # (channels, size) the model scored at: thumbnails use it
    notes: list[str] = field(default_factory=list)  # what could not be shown, and why
    storage_options: StorageOptions = None

    @property
    def score(self) -> str:
        return self.manifest.get("options", {}).get("score", "?")

    @property
    def threshold_quantile(self) -> float | None:
        return self.manifest.get("options", {}).get("threshold_quantile")


def load_run(partition_url: str, storage_options: StorageOptions = None) -> RunData:
    """Read a finished partition (``_manifest.json`` must exist) for the report."""
    try:
        manifest = read_manifest(partition_url, storage_options)
    except FileNotFoundError:
        raise ConfigError(f"{partition_url}: not an embed partition (no {MANIFEST}); vaepipe report reads the folder "
                          "vaepipe embed wrote (with --run-date: OUT/dt=YYYY-MM-DD)") from None
    files = manifest.get("files") or data_files(partition_url, storage_options)
    urls = [join(partition_url, f) for f in files]
    rows = _read_tables(urls, ROW_FIELDS, storage_options, locate=True)
    errors_url = manifest.get("errors_url")
    error_files = data_files(errors_url, storage_options) if errors_url else []
    errors = _read_tables([join(errors_url, f) for f in error_files], ERROR_FIELDS, storage_options)
    run = RunData(partition_url, manifest, rows, errors, files=urls, storage_options=storage_options)
    _add_checkpoint(run, storage_options)
    return run


def _read_tables(urls: list[str], columns: tuple[str, ...], storage_options: StorageOptions,
                 locate: bool = False) -> pa.Table:
    """``columns`` of every file (nulls where a file lacks one); ``locate``: add ``_file`` (index
    into ``urls``) and ``_row`` (row within it)."""
    tables = []
    for i, url in enumerate(urls):
        t = _read_file(url, columns, storage_options)
        if locate:
            t = t.append_column("_file", pa.array(np.full(len(t), i, np.int32)))
            t = t.append_column("_row", pa.array(np.arange(len(t), dtype=np.int64)))
        tables.append(t)
    if not tables:
        names = list(columns) + (["_file", "_row"] if locate else [])
        return pa.table({c: pa.array([], pa.string()) for c in names})
    return pa.concat_tables(tables, promote_options="permissive")


def _read_file(url: str, columns: tuple[str, ...], storage_options: StorageOptions) -> pa.Table:
    fs, path = get_fs(url, storage_options)
    with fs.open(path, "rb") as f:
        have = pq.ParquetFile(f).schema_arrow.names
        f.seek(0)
        t = read_parquet(f, columns=[c for c in columns if c in have],
                         read_dictionary=[c for c in ("shard", "error_type", "stage") if c in have])
    for c in columns:  # a column the writer left out (older outputs): nulls
        if c not in t.column_names:
            t = t.append_column(c, pa.nulls(len(t)))
    return t.select(list(columns))


def row_details(run: RunData, indices: np.ndarray) -> list[dict[str, Any]]:
    """The rows at ``indices`` of ``run.rows`` as dicts, with their key and label read back."""
    if not len(indices):
        return []
    picked = run.rows.take(pa.array(indices)).to_pylist()
    by_file: dict[int, list[dict[str, Any]]] = {}
    for r in picked:
        by_file.setdefault(r["_file"], []).append(r)
    for i, rs in by_file.items():
        details = _read_file(run.files[i], DETAIL_FIELDS, run.storage_options)
        for r, d in zip(rs, details.take(pa.array([r["_row"] for r in rs])).to_pylist()):
            r.update(d)
    return picked


def _add_checkpoint(run: RunData, storage_options: StorageOptions) -> None:
    """The validation quantiles of the run's score, from the checkpoint the manifest names."""
    from vae_model.checkpoint_header import inspect_checkpoint

    url = run.manifest.get("checkpoint")
    if not url:
        run.notes.append("the manifest names no checkpoint: no validation distribution")
        return
    try:
        ckpt = inspect_checkpoint(url, storage_options)
    except Exception as exc:  # moved, deleted, unreadable: the report still shows the night
        run.notes.append(f"checkpoint {url} not readable ({type(exc).__name__}: {exc}): no validation distribution")
        return
    run.image_shape = (ckpt.config.channels, ckpt.config.image_size)
    if ckpt.calibration_id and ckpt.calibration_id != run.manifest.get("calibration"):
        run.notes.append(f"checkpoint {url} was recalibrated since this run (calibration "
                         f"{ckpt.calibration_id}, the run used {run.manifest.get('calibration')}): "
                         "validation distribution not shown")
        return
    run.validation = ckpt.score_quantiles.get(run.score)
    if run.validation is None:
        run.notes.append(f"checkpoint {url} stores no validation quantiles for score {run.score}")


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial rate k/n (sensible at k = 0 and small n)."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def headline(run: RunData) -> dict[str, Any]:
    """The numbers at the top of the report."""
    m, totals = run.manifest, run.manifest.get("totals", {})
    flags = run.rows.column("is_anomaly")
    n = len(flags) - flags.null_count  # rows with a threshold (a checkpoint without quantiles has none)
    k = int(pc.sum(flags.cast(pa.int64())).as_py() or 0)
    q = run.threshold_quantile
    expected = 1.0 - q if q is not None else None
    lo, hi = wilson_interval(k, n)
    verdict = None
    if expected is not None and n:
        verdict = "above expected" if lo > expected else "below expected" if hi < expected else "as expected"
    return {
        "images_in": totals.get("images_seen"), "rows": totals.get("rows", len(run.rows)),
        "dead_letters": totals.get("errors", len(run.errors)), "flagged": k, "scored": n,
        "flagged_rate": k / n if n else None, "expected_rate": expected, "rate_ci": (lo, hi),
        "rate_verdict": verdict, "score": run.score, "model_id": m.get("model_id"),
        "calibration": m.get("calibration"), "run_date": m.get("run_date") or (m.get("started_at") or "")[:10],
        "runner": m.get("runner"), "seconds": m.get("seconds"), "images_per_s": m.get("images_per_s"),
        "reconciled": m.get("reconciled"), "shards": totals.get("shards"),
        "worker_processes": m.get("worker_processes"), "started_at": m.get("started_at"),
    }


def validation_density(table: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """The validation score density implied by a stored quantile table: ``(edges, density)``.

    The table's CDF is piecewise linear through (min, 0), its quantiles and (max, 1) (the
    interpolation :func:`vae_model.calibration.percentile_of` scores with), so the density is
    piecewise constant: the quantile step over the score step between neighbouring points."""
    pts = sorted((float(k), float(v)) for k, v in table.items() if k not in ("min", "max", "n"))
    qs = np.asarray([0.0] + [q for q, _ in pts] + [1.0])
    vs = np.asarray([table.get("min", pts[0][1])] + [v for _, v in pts] + [table.get("max", pts[-1][1])])
    vs = np.maximum.accumulate(vs)
    widths = np.diff(vs)  # tied values (a point mass) give a zero-width step
    return vs, np.divide(np.diff(qs), widths, out=np.zeros_like(widths), where=widths > 0)


def column(table: pa.Table, name: str) -> np.ndarray:
    """A numeric column as float64 with NaN for nulls."""
    return np.asarray(table.column(name).to_numpy(zero_copy_only=False), dtype=np.float64)
