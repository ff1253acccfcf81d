"""Atomic, streaming Parquet output for one input shard.

Rows are written batch by batch into a temporary local file (memory stays flat however large
the shard), then committed in one step: a rename on local disk, a single upload on object
storage. Readers never see a partial file; a rerun replaces the file instead of adding one.
"""
from __future__ import annotations

import json
import os
import tempfile
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from vae_model.errors import StorageError
from vae_model.storage import StorageOptions, describe_storage_error, fresh_fs, get_fs, is_local

COMPRESSION = "zstd"


class AtomicParquetWriter:
    """Write record batches to ``url``; nothing is visible there until :meth:`commit`."""

    def __init__(self, url: str, schema: pa.Schema, storage_options: StorageOptions = None,
                 row_group_size: int = 8192) -> None:
        self.url = url
        self.fs, self.path = get_fs(url, storage_options)
        self.local = is_local(self.fs)
        if self.local:
            parent = os.path.dirname(self.path) or "."
            os.makedirs(parent, exist_ok=True)
            self.tmp = os.path.join(parent, f".{os.path.basename(self.path)}.tmp-{uuid.uuid4().hex}")
        else:
            fd, self.tmp = tempfile.mkstemp(prefix="vaepipe-", suffix=".parquet")
            os.close(fd)
        self.schema = schema
        self.row_group_size = row_group_size
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self.rows = 0
        self._writer = pq.ParquetWriter(self.tmp, schema, compression=COMPRESSION)

    def write(self, batch: pa.RecordBatch) -> None:
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        self.rows += batch.num_rows
        if self._pending_rows >= self.row_group_size:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_table(pa.Table.from_batches(self._pending, self.schema),
                                     row_group_size=self.row_group_size)
            self._pending, self._pending_rows = [], 0

    def commit(self, metadata: dict[str, Any] | None = None) -> None:
        self._flush()
        if metadata:
            self._writer.add_key_value_metadata({k: v if isinstance(v, str) else json.dumps(v)
                                                 for k, v in metadata.items()})
        self._writer.close()
        try:
            if self.local:
                os.replace(self.tmp, self.path)
            else:
                self.fs.put_file(self.tmp, self.path)
        except Exception as exc:
            raise StorageError(describe_storage_error(self.url, exc)) from None
        finally:
            self._cleanup()

    def abort(self) -> None:
        try:
            self._writer.close()
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


def check_writable(url: str, storage_options: StorageOptions = None) -> None:
    """Write and delete a probe object under ``url``: a read-only disk, a missing bucket or
    missing write permission fails here, before a run writes anything."""
    probe = url.rstrip("/") + f"/_vaepipe_write_probe-{uuid.uuid4().hex}"
    fs, path = get_fs(probe, storage_options)
    try:
        if is_local(fs):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        fs.pipe_file(path, b"")
        fs.rm(path)
    except Exception as exc:  # storage backends raise many types
        raise StorageError(f"output not writable: {describe_storage_error(url, exc)}") from None


def remove_stale_temp_files(url: str, storage_options: StorageOptions = None) -> int:
    """Delete temp files a killed earlier run left in a local output folder (object stores
    never see them: there the temp file is on the worker's local disk). Returns the count.

    Call it only while holding the partition's lease (:mod:`pipeline.lease`): then every temp
    file there belongs to a run that is gone."""
    fs, path = get_fs(url, storage_options)
    if not is_local(fs) or not os.path.isdir(path):
        return 0
    stale = [n for n in os.listdir(path) if n.startswith(".") and ".tmp-" in n]
    for n in stale:
        os.unlink(os.path.join(path, n))
    return len(stale)


def read_parquet(source: Any, columns: list[str] | None = None,
                 read_dictionary: list[str] | None = None) -> pa.Table:
    """A whole Parquet file (its bytes, or an open binary file) as one table, through ``pq.ParquetFile``.

    Never ``pq.read_table`` in this package: it reads through ``pyarrow.dataset``, whose scanner
    threads can outlive the interpreter's teardown and abort the process *after* its work is done
    ("terminate called without an active exception", exit status 134; apache/arrow#34314). A
    script that loads a vector index aborted in 34 of 100 runs with it and 0 of 100 with this
    (pyarrow 25.0.1; tests/test_writer.py runs the check)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = pa.BufferReader(source)
    return pq.ParquetFile(source, read_dictionary=read_dictionary).read(columns=columns)


def read_metadata(url: str, storage_options: StorageOptions = None) -> dict[str, str] | None:
    """The key-value metadata of a Parquet file, or None if it does not exist/is unreadable."""
    fs, path = fresh_fs(url, storage_options)  # may be another process's output
    try:
        with fs.open(path, "rb") as f:
            md = pq.ParquetFile(f).metadata.metadata or {}
    except FileNotFoundError:
        return None
    except Exception:  # unreadable/partial: treat as absent so it gets rewritten
        return None
    return {k.decode(): v.decode() for k, v in md.items()}
