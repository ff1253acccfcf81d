"""The run's manifest: written last, with ``_SUCCESS``, once every shard is committed."""
from __future__ import annotations

import datetime as dt
import json
from typing import Any

from vae_model.storage import StorageOptions, atomic_write_bytes, fresh_fs, join

MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"


def build_manifest(summaries: list[dict], context: dict[str, Any]) -> dict[str, Any]:
    shards = sorted(summaries, key=lambda s: s["shard"])
    totals = {k: sum(s[k] for s in shards) for k in ("images_seen", "rows", "errors")}
    totals["shards"] = len(shards)
    totals["shards_skipped"] = sum(1 for s in shards if s.get("skipped"))
    finished = dt.datetime.now(dt.timezone.utc)
    started = dt.datetime.fromisoformat(context["started_at"])
    secs = (finished - started).total_seconds()
    worked = [s for s in shards if not s.get("skipped")]
    return {
        **{k: v for k, v in context.items() if k != "inputs"},
        "finished_at": finished.isoformat(timespec="milliseconds"),
        "seconds": round(secs, 3),
        "images_per_s": round(sum(s["images_seen"] for s in worked) / secs, 2) if secs > 0 else None,
        "worker_processes": len({s.get("pid") for s in worked}),
        "totals": totals,
        "reconciled": all(_reconciled(s) for s in shards) and len(shards) == len(context.get("inputs", shards)),
        "inputs": context.get("inputs", []),
        "shards": shards,
    }


def _reconciled(summary: dict) -> bool:
    """Did every member the reader counted in the shard come out as a row or a dead letter?

    ``members`` is counted from the shard itself (pipeline.shards.ShardTally), apart from what was
    emitted. Outputs written before that count existed have none: they are taken at their word.
    """
    members = summary.get("members", summary["images_seen"])
    return members == summary["rows"] + summary["errors"]


def write_manifest(summaries: list[dict], context: dict[str, Any], storage_options: StorageOptions = None) -> dict:
    """Write ``_manifest.json`` then ``_SUCCESS`` under the run's partition URL."""
    manifest = build_manifest(summaries, context)
    base = context["partition_url"]
    atomic_write_bytes(join(base, MANIFEST), json.dumps(manifest, indent=2).encode(), storage_options)
    atomic_write_bytes(join(base, SUCCESS), b"", storage_options)
    return manifest


def clear_success(partition_url: str, storage_options: StorageOptions = None) -> None:
    """Remove ``_SUCCESS`` before a rerun, so a half-done rerun never looks complete."""
    fs, path = fresh_fs(join(partition_url, SUCCESS), storage_options)
    if fs.exists(path):
        fs.rm(path)


def read_manifest(partition_url: str, storage_options: StorageOptions = None) -> dict:
    # Written by a worker process; this process may hold a listing of the folder from before.
    fs, path = fresh_fs(join(partition_url, MANIFEST), storage_options)
    with fs.open(path, "rb") as f:
        return json.loads(f.read())
