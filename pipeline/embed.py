"""Embed and score one shard: the pipeline's unit of work, independent of Beam.

One call streams a shard's members, decodes them in a background thread, scores them in
batches of ``batch_size`` on the model's device, and writes one Parquet file of rows (plus one
of dead letters, when any) atomically. Every member ends up as exactly one row or one dead
letter; the counts go into the file's metadata and the returned summary.
"""
from __future__ import annotations

import collections
import datetime as dt
import json
import logging
import os
import queue
import threading
import time
from typing import Any, Iterator, NamedTuple

import numpy as np
import pyarrow as pa
import torch

from pipeline.decode import decode_image
from pipeline.lease import check_driver
from pipeline.members import ReadLimits, ShardTally, escape_key, printable
from pipeline.options import EmbedOptions, check_score_supported, output_key, output_name, resolve_resize
from pipeline.schema import ERROR_SCHEMA, latent_schema
from pipeline.shards import ShardSpec, iter_members
from pipeline.writer import AtomicParquetWriter, read_metadata
from vae_model.calibration import percentile_of, threshold_for
from vae_model.checkpoint import Checkpoint, load_checkpoint
from vae_model.checkpoint_header import calibration_id
from vae_model.device import pick_device, scoring_precision
from vae_model.config import NO_SCORE
from vae_model.errors import ImageDecodeError
from vae_model.runtime import HeapWatch
from vae_model.scoring import ScoreOptions, for_scoring, score_batch
from vae_model.storage import join, remove_if_exists

log = logging.getLogger(__name__)


# The device and scoring-precision policy (vae_model.device), under the names embed has always used.
resolve_device = pick_device
resolve_precision = scoring_precision


class _Prefetch:
    """Run an iterator in a daemon thread, ``depth`` items ahead (decode overlaps compute)."""

    _END = object()

    def __init__(self, it: Iterator, depth: int = 2) -> None:
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.exc: BaseException | None = None
        self.t = threading.Thread(target=self._run, args=(it,), daemon=True)
        self.t.start()

    def _run(self, it: Iterator) -> None:
        try:
            for item in it:
                self.q.put(item)
        except BaseException as exc:  # re-raised in the consumer
            self.exc = exc
        finally:
            self.q.put(self._END)

    def __iter__(self) -> Iterator:
        while True:
            item = self.q.get()
            if item is self._END:
                if self.exc is not None:
                    raise self.exc
                return
            yield item


class BatchItem(NamedTuple):
    """One decoded image on its way to a row (the row's other columns come from its scores)."""

    key: str  # the row's key: escaped shard name + "/" + member key
    index: int  # position in the shard
    label: int | None
    meta: Any  # the JSON sidecar / metadata cell, parsed; None when absent
    pixels: np.ndarray  # uint8 (C, H, W)


def _column(value: Any, typ: pa.DataType, n: int) -> pa.Array:
    """One row column of ``n`` values; ``None``: a null column (a score this run does not compute)."""
    if value is None:
        return pa.nulls(n, typ)
    if pa.types.is_fixed_size_list(typ):  # the embedding: (n, latent_dim) float32
        return pa.FixedSizeListArray.from_arrays(pa.array(value.reshape(-1), typ.value_type), typ.list_size)
    return pa.array(value, typ)


def dead_letter(key: str | None, shard: str | None, index: int | None, stage: str, etype: str, message: str,
                model_id: str, run_date: dt.date | None) -> dict:
    """One dead letter (pipeline.schema.ERROR_COLUMNS): shards and :mod:`pipeline.handler` both build them here."""
    return {"key": key, "shard": shard, "index": index, "stage": stage, "error_type": etype,
            "message": printable(message[:2000]), "model_id": model_id, "run_date": run_date}


class ShardEmbedder:
    """Loads the model once; :meth:`process` embeds one shard end to end."""

    def __init__(self, opts: EmbedOptions, checkpoint: Checkpoint | None = None) -> None:
        self.opts = opts
        if opts.torch_threads:
            torch.set_num_threads(opts.torch_threads)
        self.device = resolve_device(opts.device)
        self.ckpt = checkpoint or load_checkpoint(opts.checkpoint, opts.storage_options, map_location=self.device)
        self.opts = opts = resolve_resize(opts, self.ckpt.meta)  # the driver resolved it already; others too
        for_scoring(self.ckpt.model, self.device, resolve_precision(opts.precision, self.device))
        self.cfg = self.ckpt.config
        self.schema = latent_schema(self.cfg.latent_dim)
        reference = check_score_supported(opts, self.ckpt)
        self.score_opts = ScoreOptions(score=opts.score, iwae_k=opts.iwae_k, seed=opts.seed,
                                       precision=resolve_precision(opts.precision, self.device),
                                       reference=reference)
        self.table = self.ckpt.score_quantiles.get(opts.score)
        self.threshold = threshold_for(self.table, opts.threshold_quantile) if self.table else None
        if self.table is None and opts.score != NO_SCORE:
            log.warning("checkpoint has no validation quantiles for score %r: anomaly_percentile and is_anomaly "
                        "will be null", opts.score)
        self.run_date = dt.date.fromisoformat(opts.run_date) if opts.run_date else None
        # trims the heap after any batch once it has grown (_score), and between shards: a bounded resident size in
        # shards of any size and on RunInference's stream (score_rows), which has no shard ends
        self.heap = HeapWatch()
        self.output_key, settings = output_key(opts, self.ckpt.model_id, calibration_id(self.ckpt.meta),
                                               self.score_opts.precision)
        self.file_meta = {
            "vaepipe.output_key": self.output_key,
            "vaepipe.settings": json.dumps(settings, sort_keys=True, default=str),
            "vaepipe.model_id": self.ckpt.model_id,
            "vaepipe.calibration": calibration_id(self.ckpt.meta),
            "vaepipe.config": json.dumps(self.cfg.to_dict(), sort_keys=True),
            "vaepipe.score": opts.score,
            "vaepipe.iwae_k": str(opts.iwae_k),
            "vaepipe.threshold": json.dumps(self.threshold),
            "vaepipe.threshold_quantile": str(opts.threshold_quantile),
        }

    # -- outputs -------------------------------------------------------------------------
    def rows_url(self, spec: ShardSpec) -> str:
        return join(self.opts.partition_url, output_name(spec))

    def errors_url(self, spec: ShardSpec) -> str:
        return join(self.opts.errors_url, output_name(spec))

    def existing(self, spec: ShardSpec) -> dict | None:
        """Summary of a complete earlier output for this shard written with the same output key
        (model, calibration and every option that changes a row: :func:`output_key`)."""
        md = read_metadata(self.rows_url(spec), self.opts.storage_options)
        if not md or md.get("vaepipe.output_key") != self.output_key:
            return None
        try:
            counts = json.loads(md["vaepipe.counts"])
        except (KeyError, json.JSONDecodeError):
            return None
        return {"shard": spec.name, "output": self.rows_url(spec), **counts, "skipped": True, "seconds": 0.0,
                "pid": os.getpid()}

    # -- work ----------------------------------------------------------------------------
    def _decoded(self, spec: ShardSpec, errors: list[dict], tally: ShardTally) -> Iterator[list[BatchItem]]:
        """Batches of decoded images (:class:`BatchItem`); read/decode failures go to ``errors``;
        the reader counts what the shard contains into ``tally``."""
        c, size, bs = self.cfg.channels, self.cfg.image_size, self.opts.batch_size
        limits = ReadLimits(self.opts.max_member_bytes, self.opts.max_sidecar_bytes)
        shard = escape_key(spec.name)
        batch: list[BatchItem] = []
        for m in iter_members(spec, self.opts.storage_options, limits=limits, tally=tally):
            key = f"{shard}/{m.key}"
            if m.error is not None or m.data is None:
                errors.append(self._error(key, spec, m.index, "read", m.error_type or "ReadError",
                                          m.error or "member has no data"))
                continue
            self._work["bytes_read"] += len(m.data)
            t = time.perf_counter()
            try:
                pixels = decode_image(m.data, c, size, max_pixels=self.opts.max_pixels, resize=self.opts.resize)
            except ImageDecodeError as exc:
                etype = getattr(exc, "error_type", "ImageDecodeError")
                errors.append(self._error(key, spec, m.index, "decode", etype, str(exc)))
                continue
            finally:
                self._work["decode_seconds"] += time.perf_counter() - t
            batch.append(BatchItem(key, m.index, m.label, m.meta, pixels))
            if len(batch) == bs:
                yield batch
                batch = []
        if batch:
            yield batch

    def _error(self, key: str, spec: ShardSpec, index: int, stage: str, etype: str, message: str) -> dict:
        return dead_letter(key, escape_key(spec.name), index, stage, etype, message, self.ckpt.model_id, self.run_date)

    def _record_batch(self, spec: ShardSpec, batch: list[BatchItem], s: dict[str, np.ndarray]) -> pa.RecordBatch:
        return self.record_batch(batch, [escape_key(spec.name)] * len(batch), s)

    def record_batch(self, batch: list[BatchItem], shards: list[str | None], s: dict[str, np.ndarray]
                     ) -> pa.RecordBatch:
        """The rows of scored images: every column of ``self.schema`` (pipeline.schema.ROW_COLUMNS)
        in order, from the item, its shard (the escaped shard name; one per item), the run, or the
        score of the same name (null when not computed). The one row builder: shards and
        :mod:`pipeline.handler` (Beam's RunInference, ScoreImages) both call it."""
        n, score = len(batch), s.get("anomaly_score")  # absent with --score none: null score columns
        values = {**s,
                  "key": [b.key for b in batch], "index": [b.index for b in batch], "label": [b.label for b in batch],
                  "meta": [json.dumps(b.meta) if b.meta is not None else None for b in batch],
                  "shard": shards, "model_id": [self.ckpt.model_id] * n,
                  "run_date": [self.run_date] * n,
                  "anomaly_percentile": percentile_of(score, self.table) if self.table and score is not None else None,
                  "is_anomaly": score > self.threshold if self.threshold is not None and score is not None else None}
        cols = [_column(values.get(f.name), f.type, n) for f in self.schema]
        return pa.RecordBatch.from_arrays(cols, schema=self.schema)

    def process(self, spec: ShardSpec) -> dict:
        """Embed one shard (or skip it if its output is complete); returns its summary."""
        check_driver(self.opts)  # a worker whose driver died or lost its lease commits nothing more
        if self.opts.skip_existing:
            done = self.existing(spec)
            if done is not None:
                log.info("skip %s: output exists for model %s", spec.name, self.ckpt.model_id)
                return done
        t0 = time.monotonic()
        started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
        so = self.opts.storage_options
        errors: list[dict] = []
        tally = ShardTally()
        # encoded image bytes read, seconds decoding (the prefetch thread) and scoring: Beam metrics
        self._work = {"bytes_read": 0, "decode_seconds": 0.0, "score_seconds": 0.0}
        writer = AtomicParquetWriter(self.rows_url(spec), self.schema, so)
        trims = self.heap.trims
        try:
            for batch in _Prefetch(self._decoded(spec, errors, tally)):
                for part, s in self._scored(spec, batch, errors):
                    writer.write(self._record_batch(spec, part, s))
            # members: what the shard contains, counted by the reader; reconciled against rows + errors
            counts = {"members": tally.members, "images_seen": writer.rows + len(errors), "rows": writer.rows,
                      "errors": len(errors)}
            self._write_errors(spec, errors)
            check_driver(self.opts, lease=False)
            writer.commit({**self.file_meta, "vaepipe.shard": escape_key(spec.name),
                           "vaepipe.counts": json.dumps(counts)})
        except BaseException:
            writer.abort()
            raise
        finally:
            self.heap.release()  # the shard's freed batches go back to the kernel: flat RSS over many shards
        secs = time.monotonic() - t0
        log.info("shard %s: %d rows, %d errors in %.2fs (%.0f img/s)", spec.name, counts["rows"], counts["errors"],
                 secs, counts["images_seen"] / max(secs, 1e-9))
        return {"shard": spec.name, "output": self.rows_url(spec), **counts, "skipped": False,
                "started_at": started, "seconds": round(secs, 4), "pid": os.getpid(),
                **{k: round(v, 4) for k, v in self._work.items()}, "heap_trims": self.heap.trims - trims,
                "dead_letters": dict(collections.Counter(e["error_type"] for e in errors))}

    def score_rows(self, batch: list[BatchItem], shards: list[str | None]) -> pa.RecordBatch:
        """Score decoded images and build their rows (:meth:`record_batch`): one call per batch, so
        that a model shared across processes (a proxy, :mod:`pipeline.handler`) costs one round trip."""
        return self.record_batch(batch, shards, self._score(np.stack([b.pixels for b in batch])))

    def _score(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """The scores of uint8 images (B, C, H, W) (:func:`vae_model.scoring.score_batch`)."""
        scores = score_batch(self.ckpt.model, pixels, None, self.score_opts, self.device)
        self.heap.check()
        return scores

    def _scored(self, spec: ShardSpec, batch: list[BatchItem], errors: list[dict]
                ) -> Iterator[tuple[list[BatchItem], dict]]:
        """Score a batch; when that fails (out of memory, ...) score its halves, down to single
        images, so one failure costs the fewest images (dead letters) and never the job."""
        t = time.perf_counter()
        try:
            scores = self._score(np.stack([b.pixels for b in batch]))
        except (MemoryError, RuntimeError, ValueError) as exc:  # RuntimeError: torch's out of memory
            failure = (type(exc).__name__, " ".join(str(exc).split()))  # not exc: its frames hold the batch
        else:
            self._work["score_seconds"] += time.perf_counter() - t
            yield batch, scores
            return
        if len(batch) == 1:
            errors.append(self._error(batch[0].key, spec, batch[0].index, "score", *failure))
            return
        log.warning("%s: scoring %d images failed (%s: %.200s); retrying in halves", spec.name, len(batch), *failure)
        mid = len(batch) // 2
        yield from self._scored(spec, batch[:mid], errors)
        yield from self._scored(spec, batch[mid:], errors)

    def _write_errors(self, spec: ShardSpec, errors: list[dict]) -> None:
        url = self.errors_url(spec)
        if not errors:
            remove_if_exists(url, self.opts.storage_options)  # stale dead letters of an earlier run of the shard
            return
        w = AtomicParquetWriter(url, ERROR_SCHEMA, self.opts.storage_options)
        w.write(pa.RecordBatch.from_pylist(errors, schema=ERROR_SCHEMA))
        w.commit({"vaepipe.model_id": self.ckpt.model_id, "vaepipe.shard": spec.name})
