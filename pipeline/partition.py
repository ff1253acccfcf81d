"""What an output partition holds, and what a new run may do with it (``--mode``).

A partition (``OUT`` or ``OUT/dt=YYYY-MM-DD``) must describe one consistent run: every rows file
in it written with the same output key (model, calibration and row-changing settings:
:func:`pipeline.options.output_key`). Files of this run's own input shards are skipped or
rewritten by the run itself; files of *other* shards are what ``--mode`` decides about:

* ``refuse`` (default): refuse to run, one line naming them and how to proceed;
* ``append``: keep them, only when every one has this run's output key; the manifest then
  counts them as ``kept``;
* ``overwrite``: delete them (rows and dead letters) once this run has committed every shard,
  just before its manifest and ``_SUCCESS`` are written.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from vae_model.errors import StorageError, VaePipeError
from vae_model.storage import StorageOptions, describe_storage_error, fresh_fs, join, remove_if_exists

from .writer import read_metadata

log = logging.getLogger(__name__)


class PartitionConflictError(VaePipeError):
    """The output partition holds rows that this run would mix with its own."""


@dataclass
class PartitionPlan:
    kept: list[dict] = field(default_factory=list)  # summaries of other shards' files kept (append)
    delete: list[str] = field(default_factory=list)  # file names of other shards to delete (overwrite)


def data_files(folder_url: str, storage_options: StorageOptions = None) -> list[str]:
    """Names of the Parquet files directly in ``folder_url`` (not ``.``/``_`` files, not subfolders)."""
    fs, path = fresh_fs(folder_url, storage_options)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    except Exception as exc:  # storage backends raise many types
        raise StorageError(describe_storage_error(folder_url, exc)) from None
    names = (e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "file")
    return sorted(n for n in names if n.endswith(".parquet") and not n.startswith((".", "_")))


def plan_partition(partition_url: str, inputs: set[str], mode: str, key: str, model_id: str,
                   storage_options: StorageOptions = None) -> PartitionPlan:
    """Check the partition's files of shards outside ``inputs`` (output names) against ``mode``.

    Raises:
        PartitionConflictError: ``refuse`` and such files exist, or ``append`` and one has
            another output key.
    """
    others = [n for n in data_files(partition_url, storage_options) if n not in inputs]
    if not others:
        return PartitionPlan()
    meta = {n: read_metadata(join(partition_url, n), storage_options) or {} for n in others}
    if mode == "overwrite":
        return PartitionPlan(delete=others)
    foreign = [n for n in others if meta[n].get("vaepipe.output_key") != key]
    if mode == "refuse" or foreign:
        name = (foreign or others)[0]
        other_model = meta[name].get("vaepipe.model_id", "unknown")
        what = "a different model or settings" if foreign else "shards this run does not read"
        same = "same" if other_model == model_id else "other"
        raise PartitionConflictError(
            f"{partition_url} already holds {len(others)} output file(s) of {what} (e.g. {name}, {same} model "
            f"{other_model}); pass --mode overwrite to replace them"
            + ("" if foreign else ", --mode append to add this run's shards to them")
            + ", or write to another --out or --run-date")
    kept = []
    for n in others:
        try:
            counts = json.loads(meta[n].get("vaepipe.counts", "{}"))
        except json.JSONDecodeError:
            counts = {}
        kept.append({"shard": meta[n].get("vaepipe.shard", n), "output": join(partition_url, n), **counts,
                     "kept": True})
    return PartitionPlan(kept=kept)


def delete_files(urls: list[str], storage_options: StorageOptions = None) -> None:
    """Delete output files (missing ones are fine: a rerun of an interrupted overwrite)."""
    for url in urls:
        if remove_if_exists(url, storage_options):
            log.info("deleted %s (--mode overwrite)", url)
