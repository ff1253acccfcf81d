"""``run()``: the embedding pipeline from image shards to Parquet latents and anomaly scores.

    python -m pipeline.run s3://bucket/images/*.tar --checkpoint s3://bucket/m.safetensors \\
        --out s3://bucket/latents/ --run-date 2026-11-28 --runner=DataflowRunner --project=...

Flags this module does not know go to Beam's ``PipelineOptions`` when Beam knows them (any
other is refused: :func:`pipeline.runner_args.check_beam_flags`). Pre-flight checks (flags,
checkpoint, shards, output writable, the partition's lease and contents) run before the pipeline
is built: a bad input fails with one line and nothing written.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import logging
import sys
from typing import Callable

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.drift import exit_status
from pipeline.lease import Lease, RunAbandonedError, this_process
from pipeline.manifest import add_to_manifest, clear_success
from pipeline.metrics import query_metrics
from pipeline.options import (EMBED_FLAGS, REQUIRED_FLAGS, EmbedOptions, check_score_supported, flag_default,
                              options_dict, output_key, output_name, resolve_resize)
from pipeline.partition import plan_partition
from pipeline.progress import Progress, ProgressWatcher
from pipeline.report import write_report_or_warn
from pipeline.runner_args import (check_beam_flags, dask_args, gpu_present, local_parallelism_args, runner_name,
                                  threads_per_worker)
from pipeline.shard_listing import check_output_outside_input
from pipeline.shards import expand_shards
from pipeline.transforms import EmbedShards, ReadImageShards, WriteManifest
from pipeline.writer import check_writable, remove_stale_temp_files
from vae_model.checkpoint_header import calibration_id, inspect_checkpoint
from vae_model.device import expected_precision
from vae_model.storage import parse_storage_options

log = logging.getLogger(__name__)

OWN_FLAGS = (tuple(f.flag for f in EMBED_FLAGS) + ("--storage-options",)
             + tuple(f"--no-{f.flag[2:]}" for f in EMBED_FLAGS if isinstance(flag_default(f.field), bool)))


def _driver_precision(opts: EmbedOptions) -> str:
    """The precision workers on this machine resolve ``auto`` to (vae_model.device, without torch)."""
    return expected_precision(opts.precision, opts.device, gpu_present())


def run_embed(data_url: str, opts: EmbedOptions, beam_args: list[str] | None = None,
              test_pipeline: beam.Pipeline | None = None,
              on_progress: Callable[[Progress], None] | None = None, use_local_cores: bool = False) -> dict:
    """Embed every shard at ``data_url``; returns the manifest that was written.

    ``on_progress`` is called every few seconds with shards done/total and images/s, as read
    from the committed output files (shards skipped as already done are not counted).
    ``use_local_cores``: on the DirectRunner without ``--direct_*`` flags, run one worker
    process per core (:func:`local_parallelism_args`; the command line does this) instead of
    Beam's single process."""
    so = opts.storage_options
    beam_args = list(beam_args or [])
    check_beam_flags(beam_args, OWN_FLAGS)  # fail fast: a mistyped flag, before anything is read
    ckpt = inspect_checkpoint(opts.checkpoint, so)  # fail fast: unreadable/tampered checkpoint (no torch here)
    check_score_supported(opts, ckpt)
    opts = resolve_resize(opts, ckpt.meta)  # before output_key: the key names the policy the rows use
    specs = expand_shards(data_url, so)  # fail fast: no shards, missing bucket, bad credentials
    check_output_outside_input(data_url, opts.out_url, so)
    check_writable(opts.out_url, so)
    if use_local_cores and test_pipeline is None:
        beam_args += local_parallelism_args(beam_args, len(specs), opts.device)
    beam_args += dask_args(beam_args, len(specs))
    options = PipelineOptions(beam_args)
    if not opts.torch_threads:
        opts = dataclasses.replace(opts, torch_threads=threads_per_worker(options))
    key, _ = output_key(opts, ckpt.model_id, calibration_id(ckpt.meta), _driver_precision(opts))
    inputs = {output_name(s) for s in specs}
    with Lease(opts.partition_url, so) as lease:
        plan = plan_partition(opts.partition_url, inputs, opts.mode, key, ckpt.model_id, so)
        opts = dataclasses.replace(opts, lease_owner=lease.owner, driver=this_process())
        clear_success(opts.partition_url, so)
        for url in (opts.partition_url, opts.errors_url):
            remove_stale_temp_files(url, so)
        runner = runner_name(beam_args)
        context = {
            "data_url": data_url, "checkpoint": opts.checkpoint, "model_id": ckpt.model_id,
            "calibration": calibration_id(ckpt.meta), "output_key": key,
            "out_url": opts.out_url, "partition_url": opts.partition_url, "errors_url": opts.errors_url,
            "run_date": opts.run_date, "runner": runner, "options": options_dict(opts), "mode": opts.mode,
            "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
            "inputs": [s.name for s in specs], "kept": plan.kept, "delete": plan.delete,
            "lease_owner": lease.owner,
            # read by the manifest step's drift check (pipeline.drift), not copied into the manifest
            "drift_reference": {"quantiles": ckpt.score_quantiles.get(opts.score),
                                "embedding_stats": ckpt.meta.get("embedding_stats")},
        }
        log.info("embedding %d shards from %s with model %s on %s", len(specs), data_url, ckpt.model_id, runner)
        p = test_pipeline or beam.Pipeline(options=options)
        _ = (p
             | "ReadImageShards" >> ReadImageShards(specs=specs)
             | "EmbedShards" >> EmbedShards(opts)
             | "WriteManifest" >> WriteManifest(context, so))
        watcher = ProgressWatcher(opts.partition_url, sorted(inputs), on_progress or _log_progress, so)
        with watcher:
            result = p.run()
            try:
                result.wait_until_finish()
            finally:
                client = getattr(result, "client", None)  # Beam's DaskRunner opens a dask Client and never closes it
                if client is not None:
                    client.close()
        if lease.lost:
            raise RunAbandonedError(f"{opts.partition_url}: another run took the output lease during this run; "
                                    "its outputs are not complete: rerun")
        # Beam metrics exist only once the pipeline has finished: added to the manifest written in it
        manifest = add_to_manifest(opts.partition_url, {"metrics": query_metrics(result)}, so)
        if opts.report:  # read from the manifest just written; a failure only logs a warning
            write_report_or_warn(opts.partition_url, so)
        return manifest


def _log_progress(progress: Progress) -> None:
    log.info("%s", progress)


def build_parser() -> argparse.ArgumentParser:
    """The embed flags (pipeline.options.EMBED_FLAGS) as argparse; unknown ones go to Beam."""
    ap = argparse.ArgumentParser(prog="python -m pipeline.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("data_url")
    for f in EMBED_FLAGS:
        default = flag_default(f.field)
        if f.field in REQUIRED_FLAGS:
            ap.add_argument(f.flag, dest=f.field, required=True, help=f.help)
        elif isinstance(default, bool):
            ap.add_argument(f.flag, dest=f.field, action=argparse.BooleanOptionalAction, default=default, help=f.help)
        else:
            ap.add_argument(f.flag, dest=f.field, type=type(default) if default is not None else str,
                            default=default, choices=f.choices, metavar=f.metavar, help=f.help)
    ap.add_argument("--storage-options", default=None)
    return ap


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None) -> dict:
    """Parse ``argv`` (our flags + any Beam flags) and run the pipeline."""
    known, beam_args = build_parser().parse_known_args(argv)
    values = vars(known)
    data_url = values.pop("data_url")
    so = parse_storage_options(values.pop("storage_options")) or None
    return run_embed(data_url, EmbedOptions(**values, storage_options=so), beam_args, test_pipeline,
                     use_local_cores=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(exit_status(run()))  # 3 with --fail-on-drift when a drift verdict failed (pipeline.drift)
