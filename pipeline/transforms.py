"""Composite Beam transforms: drop them into your own pipelines.

    specs     = p | ReadImageShards("s3://bucket/images/*.tar")
    summaries = specs | EmbedShards(EmbedOptions(checkpoint=..., out_url=...))
    _         = summaries | WriteManifest(context)

The unit of work is a shard, not an image: one element per image costs a small VAE most of
its speed in per-element overhead. ``EmbedShards`` streams each shard's members, decodes and
scores them in batches, and commits its own Parquet file atomically, so it needs no file-sink
finalize step (which is not reliable on every runner).
"""
from __future__ import annotations

import logging

import apache_beam as beam
from apache_beam.utils.shared import Shared

from pipeline.manifest import write_manifest
from pipeline.metrics import ShardMetrics
from pipeline.options import EmbedOptions
from pipeline.shards import ShardSpec, expand_shards
from vae_model.errors import worker_error

log = logging.getLogger(__name__)


class ReadImageShards(beam.PTransform):
    """URL/glob -> PCollection[ShardSpec], redistributed across workers.

    Pass ``specs`` (already listed, e.g. to fail fast before launch) or ``data_url`` (listed on
    a worker at run time).
    """

    def __init__(self, data_url: str | None = None, specs: list[ShardSpec] | None = None,
                 storage_options: dict | None = None) -> None:
        super().__init__()
        if (data_url is None) == (specs is None):
            raise ValueError("give exactly one of data_url and specs")
        self.data_url, self.specs, self.storage_options = data_url, specs, storage_options

    def expand(self, pbegin):
        if self.specs is not None:
            pcoll = pbegin | "CreateShards" >> beam.Create(self.specs)
        else:
            pcoll = (pbegin | "DataUrl" >> beam.Create([self.data_url])
                     | "MatchShards" >> beam.FlatMap(expand_shards, self.storage_options))
        return pcoll | "Reshuffle" >> beam.Reshuffle()


class _EmbedderHandle:
    """Holder that Shared can weak-reference (one model per worker process)."""

    def __init__(self, opts: EmbedOptions) -> None:
        from pipeline.embed import ShardEmbedder  # torch: imported by workers, not by the driver
        from vae_model.runtime import skip_exit_gc

        self.embedder = ShardEmbedder(opts)
        skip_exit_gc()  # no exit-time GC walk over the heap of a process that holds a model (vae_model.runtime)


class EmbedShardFn(beam.DoFn):
    """ShardSpec -> summary dict; writes the shard's rows and dead letters as a side effect."""

    def __init__(self, opts: EmbedOptions, shared: Shared | None = None) -> None:
        self.opts = opts
        self._shared = shared or Shared()
        self.metrics = ShardMetrics()  # counters and distributions in the "vaepipe" namespace

    def setup(self) -> None:
        # Loaded once per worker process and shared by its DoFn instances.
        try:
            handle = self._shared.acquire(lambda: _EmbedderHandle(self.opts),
                                          tag=f"{self.opts.checkpoint}|{self.opts.device}|{self.opts.torch_threads}")
        except Exception as exc:  # the driver prints the cause, whatever the runner wraps it in
            raise worker_error(exc) from exc
        self.embedder = handle.embedder
        self._handle = handle

    def process(self, spec: ShardSpec):
        try:
            summary = self.embedder.process(spec)
        except Exception as exc:  # the driver prints the cause, whatever the runner wraps it in
            raise worker_error(exc) from exc
        self.metrics.update(summary)
        yield summary


class EmbedShards(beam.PTransform):
    """PCollection[ShardSpec] -> PCollection[summary dict] (rows written per shard)."""

    def __init__(self, opts: EmbedOptions) -> None:
        super().__init__()
        self.opts = opts

    def expand(self, shards):
        return shards | "EmbedShard" >> beam.ParDo(EmbedShardFn(self.opts))


class WriteManifest(beam.PTransform):
    """Collect every shard summary, then write ``_manifest.json`` and ``_SUCCESS`` last."""

    def __init__(self, context: dict, storage_options: dict | None = None) -> None:
        super().__init__()
        self.context, self.storage_options = context, storage_options

    def expand(self, summaries):
        return (summaries
                | "CollectSummaries" >> beam.combiners.ToList()
                | "WriteManifest" >> beam.Map(_write_manifest, self.context, self.storage_options))


def _write_manifest(summaries: list[dict], context: dict, storage_options: dict | None) -> dict:
    try:
        return write_manifest(summaries, context, storage_options)
    except Exception as exc:  # the driver prints the cause, whatever the runner wraps it in
        raise worker_error(exc) from exc
