"""``vaepipe report``: one self-contained HTML page about a finished partition.

:func:`write_report` reads the partition (:mod:`pipeline.report_data`), draws the figures
(:mod:`pipeline.report_figures`), reads the top anomalies and a few random normal images back
from their shards (:mod:`pipeline.report_thumbs`) and writes the page
(:mod:`pipeline.report_html`) atomically, by default to ``PARTITION/_report.html`` (the
underscore keeps Parquet readers away from it). The embed driver calls
:func:`write_report_or_warn` after the manifest: a report that cannot be written never fails
the run that produced the data.
"""
from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import numpy as np
import pyarrow.compute as pc

from pipeline.report_data import RunData, headline, load_run, row_details
from vae_model.storage import StorageOptions, atomic_write_bytes, exists, join

log = logging.getLogger(__name__)

REPORT = "_report.html"
DEFAULT_TOP = 64
NORMAL_SAMPLES = 16
DEAD_LETTER_ROWS = 100


def write_report(partition_url: str, out_url: str | None = None, top: int = DEFAULT_TOP,
                 compare_url: str | None = None, storage_options: StorageOptions = None) -> str:
    """Write the report of ``partition_url`` (optionally against ``compare_url``); returns its URL."""
    url = out_url or join(partition_url, REPORT)
    atomic_write_bytes(url, build_report(partition_url, top, compare_url, storage_options).encode("utf-8"),
                       storage_options)
    log.info("report written to %s", url)
    return url


def write_report_or_warn(partition_url: str, storage_options: StorageOptions = None) -> str | None:
    """:func:`write_report` with the defaults; a failure is logged as a warning, not raised."""
    try:
        return write_report(partition_url, storage_options=storage_options)
    except Exception as exc:  # the run's data is committed: the report is a view of it, never its cause to fail
        log.warning("report for %s not written: %s: %s", partition_url, type(exc).__name__, exc)
        return None


def written_report(partition_url: str, storage_options: StorageOptions = None) -> str | None:
    """The URL of the partition's default report if one is there."""
    url = join(partition_url, REPORT)
    return url if exists(url, storage_options) else None


def build_report(partition_url: str, top: int = DEFAULT_TOP, compare_url: str | None = None,
                 storage_options: StorageOptions = None) -> str:
    """The report page as a string."""
    from pipeline import report_figures as figs
    from pipeline import report_html as H
    from pipeline.report_thumbs import thumbnails

    if top < 0:
        raise ValueError(f"--top {top}: must be 0 or more")
    run = load_run(partition_url, storage_options)
    prev = load_run(compare_url, storage_options) if compare_url else None
    head = headline(run)
    notes = list(run.notes)
    top_rows, normal_rows = _top_rows(run, top), _normal_rows(run, NORMAL_SAMPLES)
    uris, thumb_notes = thumbnails(top_rows + normal_rows, run.image_shape, run.manifest.get("data_url"),
                                   storage_options)
    notes += thumb_notes[:20]
    sections: list[tuple[str, str]] = [("", H.headline_cards(head, headline(prev) if prev else None))]
    sections.append(("", H.drift_table(run.manifest["drift"]) if run.manifest.get("drift") else ""))
    against = f" (outline: previous night, {compare_url})" if prev else ""
    fig_html = "".join(f'<figure><img alt="{H._e(name)}" src="{fn(run, prev)}"></figure>' for name, fn in figs.FIGURES)
    sections.append((f"Figures{against}", f'<div class="figs">{fig_html}</div>'))
    sections.append((f"Top {len(top_rows)} anomalies (highest anomaly_score)", H.tile_grid(_tiles(top_rows, uris),
                                                                                         "top-anomalies")))
    sections.append((f"{len(normal_rows)} random rows not flagged, for contrast",
                     H.tile_grid(_tiles(normal_rows, uris), "normal-samples")))
    letters = _dead_letters(run, DEAD_LETTER_ROWS)
    sections.append((f"Dead letters ({len(run.errors):,})", H.dead_letter_table(letters, len(run.errors))))
    title = f"vaepipe run report · {head['run_date'] or partition_url}"
    sub = f"{partition_url} · {head['images_in']} images from {run.manifest.get('data_url')}"
    footer = (f"Generated {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')} by vaepipe report "
              f"from {partition_url}/_manifest.json; started {head['started_at']}, finished "
              f"{run.manifest.get('finished_at')}.")
    return H.page(title, sub, notes, sections, footer)


def _row_dicts(run: RunData, indices: np.ndarray) -> list[dict[str, Any]]:
    return row_details(run, indices)


def _top_rows(run: RunData, n: int) -> list[dict[str, Any]]:
    if not n or not len(run.rows):
        return []
    scores = run.rows.column("anomaly_score")
    order = pc.array_sort_indices(scores, order="descending", null_placement="at_end")
    return _row_dicts(run, order.to_numpy()[:min(n, len(scores) - scores.null_count)])  # --score none: no scores


def _normal_rows(run: RunData, n: int) -> list[dict[str, Any]]:
    """A seeded random sample of the rows not flagged: the same images on every rerun of the report."""
    flags = run.rows.column("is_anomaly").to_pylist()
    normal = np.asarray([i for i, f in enumerate(flags) if f is False], dtype=np.int64)
    if not len(normal):
        return []
    rng = np.random.default_rng(len(run.rows))
    pick = np.sort(rng.choice(normal, size=min(n, len(normal)), replace=False))
    return _row_dicts(run, pick)


def _tiles(rows: list[dict[str, Any]], uris: dict[tuple[str, int], str]) -> list[dict[str, Any]]:
    tiles = []
    for r in rows:
        key, shard = r["key"] or "", r["shard"] or ""
        member = key[len(shard) + 1:] if key.startswith(shard + "/") else key
        source = "/".join(shard.rstrip("/").split("/")[-2:])  # e.g. mnist/shard-000000.tar
        # keys as stored (escaped: valid UTF-8 whatever the file names were)
        tiles.append({"uri": uris.get((shard, int(r["index"]))), "key": key, "member": member,
                      "source": source,
                      "label": r["label"], "score": r["anomaly_score"], "percentile": r["anomaly_percentile"]})
    return tiles


def _dead_letters(run: RunData, n: int) -> list[dict[str, Any]]:
    """The first ``n`` dead letters, grouped by error type (most frequent type first), then by key."""
    letters = run.errors.to_pylist()
    counts: dict[str, int] = {}
    for d in letters:
        counts[d["error_type"]] = counts.get(d["error_type"], 0) + 1
    letters.sort(key=lambda d: (-counts[d["error_type"]], str(d["error_type"]), str(d["key"])))
    return letters[:n]
