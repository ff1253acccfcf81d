"""The run's manifest: written last, with ``_SUCCESS``, once every shard is committed."""
from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

from pipeline.lease import RunAbandonedError, read_lease
from pipeline.partition import data_files, delete_files
from pipeline.writer import remove_stale_temp_files
from vae_model.storage import StorageOptions, atomic_write_bytes, fresh_fs, join, remove_if_exists

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"


def build_manifest(summaries: list[dict], context: dict[str, Any], files: list[str] | None = None) -> dict[str, Any]:
    """The manifest of a partition: this run's shard summaries, the other shards' files it kept
    (``--mode append``), totals over both, and ``files``, every rows file in the partition."""
    shards = sorted(summaries, key=lambda s: s["shard"])
    kept = sorted(context.get("kept", []), key=lambda s: s["shard"])
    totals = {k: sum(s.get(k, 0) for s in shards + kept) for k in ("images_seen", "rows", "errors")}
    totals["shards"] = len(shards) + len(kept)
    totals["shards_skipped"] = sum(1 for s in shards if s.get("skipped"))
    expected = sorted(s["output"].rsplit("/", 1)[-1] for s in shards + kept)
    finished = dt.datetime.now(dt.timezone.utc)
    started = dt.datetime.fromisoformat(context["started_at"])
    secs = (finished - started).total_seconds()
    worked = [s for s in shards if not s.get("skipped")]
    return {
        **{k: v for k, v in context.items() if k not in ("inputs", "kept", "delete", "lease_owner", "drift_reference")},
        "finished_at": finished.isoformat(timespec="milliseconds"),
        "seconds": round(secs, 3),
        "images_per_s": round(sum(s["images_seen"] for s in worked) / secs, 2) if secs > 0 else None,
        "worker_processes": len({s.get("pid") for s in worked}),
        "totals": totals,
        "reconciled": all(_reconciled(s) for s in shards + kept) and len(shards) == len(context.get("inputs", shards))
        and (files is None or files == expected),
        "inputs": context.get("inputs", []),
        "shards": shards,
        "kept": kept,
        "deleted": context.get("delete", []),
        "files": expected if files is None else files,
    }


def _reconciled(summary: dict) -> bool:
    """Did every member the reader counted in the shard come out as a row or a dead letter?

    ``members`` is counted from the shard itself (pipeline.shards.ShardTally), apart from what was
    emitted. Outputs written before that count existed have none: they are taken at their word.
    """
    members = summary.get("members", summary["images_seen"])
    return members == summary["rows"] + summary["errors"]


def write_manifest(summaries: list[dict], context: dict[str, Any], storage_options: StorageOptions = None) -> dict:
    """Write ``_manifest.json`` then ``_SUCCESS`` under the run's partition URL.

    Runs once every shard is committed: first checks that the run still holds the partition's
    lease, then deletes the other shards' files ``--mode overwrite`` replaces and any temp files
    left by killed workers, then lists the partition so the manifest names every file in it."""
    base = context["partition_url"]
    owner = context.get("lease_owner")
    if owner and (read_lease(base, storage_options) or {}).get("owner") != owner:
        raise RunAbandonedError(f"{base}: this run no longer holds the output lease; no manifest written")
    delete_files([join(d, name) for name in context.get("delete", []) for d in (base, context["errors_url"])],
                 storage_options)
    for url in (base, context["errors_url"]):  # e.g. of a worker killed mid-shard and redone elsewhere
        remove_stale_temp_files(url, storage_options)
    manifest = build_manifest(summaries, context, data_files(base, storage_options))
    manifest["drift"] = _drift(base, manifest["files"], context, storage_options)
    atomic_write_bytes(join(base, MANIFEST), json.dumps(manifest, indent=2).encode(), storage_options)
    atomic_write_bytes(join(base, SUCCESS), b"", storage_options)
    return manifest


def _drift(base: str, files: list[str], context: dict[str, Any], storage_options: StorageOptions) -> dict:
    """The ``drift`` section (pipeline.drift); a failure to compute it is recorded, never the run's."""
    from pipeline.drift import partition_drift

    try:
        return partition_drift(base, files, context, storage_options)
    except Exception as exc:  # drift must not cost the run its manifest and _SUCCESS
        log.warning("%s: drift not computed: %s", base, exc)
        return {"verdict": "skipped", "failed": [], "error": f"{type(exc).__name__}: {exc}"[:500]}


def clear_success(partition_url: str, storage_options: StorageOptions = None) -> None:
    """Remove ``_SUCCESS`` before a rerun, so a half-done rerun never looks complete."""
    remove_if_exists(join(partition_url, SUCCESS), storage_options)


def add_to_manifest(partition_url: str, updates: dict, storage_options: StorageOptions = None) -> dict:
    """Add ``updates`` (the driver's Beam metrics) to the partition's manifest, atomically; returns it."""
    manifest = {**read_manifest(partition_url, storage_options), **updates}
    atomic_write_bytes(join(partition_url, MANIFEST), json.dumps(manifest, indent=2).encode(), storage_options)
    return manifest


def read_manifest(partition_url: str, storage_options: StorageOptions = None) -> dict:
    # Written by a worker process; this process may hold a listing of the folder from before.
    fs, path = fresh_fs(join(partition_url, MANIFEST), storage_options)
    with fs.open(path, "rb") as f:
        return json.loads(f.read())
