"""``run()``: the embedding pipeline from image shards to Parquet latents and anomaly scores.

    python -m pipeline.run s3://bucket/images/*.tar --checkpoint s3://bucket/m.safetensors \\
        --out s3://bucket/latents/ --run-date 2026-11-28 --runner=DataflowRunner --project=...

Flags this module does not know are handed to Beam's ``PipelineOptions`` unchanged, so every
runner's options work. Pre-flight checks (checkpoint, shards, output writable) run before the
pipeline is built: a bad input fails with one line and nothing written.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import logging
import os
import uuid
from typing import Callable

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from pipeline.options import EmbedOptions, check_score_supported, options_dict, output_name
from pipeline.progress import Progress, ProgressWatcher
from pipeline.manifest import clear_success, read_manifest
from pipeline.shards import expand_shards
from pipeline.writer import remove_stale_temp_files
from pipeline.transforms import EmbedShards, ReadImageShards, WriteManifest
from vae_model.checkpoint_header import inspect_checkpoint
from vae_model.config import SCORES
from vae_model.errors import StorageError
from vae_model.storage import describe_storage_error, get_fs, is_local, join, parse_storage_options

log = logging.getLogger(__name__)


def _check_writable(url: str, storage_options: dict | None) -> None:
    probe = join(url, f"_vaepipe_write_probe-{uuid.uuid4().hex}")
    fs, path = get_fs(probe, storage_options)
    try:
        if is_local(fs):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        fs.pipe_file(path, b"")
        fs.rm(path)
    except Exception as exc:
        raise StorageError(f"output not writable: {describe_storage_error(url, exc)}") from None


MAX_LOCAL_WORKERS = 8  # each CPU worker process holds a model and its buffers (~0.7 GB RSS here)


def _cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. under taskset or a cpuset)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _gpu_present() -> bool:
    """An NVIDIA GPU on this machine? A cheap check that imports nothing (the driver has no torch)."""
    return os.path.exists("/proc/driver/nvidia/gpus") or os.path.exists("/dev/nvidia0")


def local_parallelism_args(beam_args: list[str], n_shards: int, device: str = "auto") -> list[str]:
    """Beam flags that spread a local (DirectRunner) CPU run over this machine's cores.

    Beam's DirectRunner default is one process; ``vaepipe embed`` on a CPU machine defaults
    to ``min(cores, shards, 8)`` worker processes instead (each gets cores / workers torch
    threads): 1.14x on 2 cores (BENCHMARKS.md), more with more cores. Nothing is added when
    the flags name another runner or any ``--direct_*`` setting, when a GPU will score (one
    process feeds it as fast as eight), or when there is a single shard or core.
    """
    if any(a.startswith(("--direct_num_workers", "--direct_running_mode")) for a in beam_args):
        return []
    runner = PipelineOptions(beam_args).view_as(StandardOptions).runner
    if runner is not None and str(runner).rsplit(".", 1)[-1].lower() not in ("directrunner", "direct"):
        return []
    if device == "cuda" or (device == "auto" and _gpu_present()):
        return []
    workers = min(_cores(), n_shards, MAX_LOCAL_WORKERS)
    if workers < 2:
        return []
    return [f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"]


def _threads_per_worker(options: PipelineOptions) -> int:
    """Avoid oversubscription: split the cores among DirectRunner worker processes."""
    direct = options.view_as(DirectOptions)
    if (direct.direct_running_mode or "") == "multi_processing":
        workers = direct.direct_num_workers or 1
        if workers <= 0:  # Beam then starts one worker per CPU it counts
            workers = os.cpu_count() or 1
        return max(1, _cores() // workers)
    return 0


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
    ckpt = inspect_checkpoint(opts.checkpoint, so)  # fail fast: unreadable/tampered checkpoint (no torch here)
    check_score_supported(opts, ckpt)
    specs = expand_shards(data_url, so)  # fail fast: no shards, missing bucket, bad credentials
    _check_writable(opts.out_url, so)
    beam_args = list(beam_args or [])
    if use_local_cores and test_pipeline is None:
        beam_args += local_parallelism_args(beam_args, len(specs), opts.device)
    if any("DaskRunner" in a for a in beam_args) and not any(a.startswith("--dask_npartitions") for a in beam_args):
        # Beam's DaskRunner puts up to 128 elements in one partition by default, so a run of a few
        # shards would use one worker; one partition per shard spreads them over the cluster.
        beam_args.append(f"--dask_npartitions={max(1, len(specs))}")
    options = PipelineOptions(beam_args)
    if not opts.torch_threads:
        opts = dataclasses.replace(opts, torch_threads=_threads_per_worker(options))
    clear_success(opts.partition_url, so)
    for url in (opts.partition_url, opts.errors_url):
        remove_stale_temp_files(url, so)
    runner = options.view_as(StandardOptions).runner or "DirectRunner"
    context = {
        "data_url": data_url, "checkpoint": opts.checkpoint, "model_id": ckpt.model_id,
        "out_url": opts.out_url, "partition_url": opts.partition_url, "errors_url": opts.errors_url,
        "run_date": opts.run_date, "runner": str(runner), "options": options_dict(opts),
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
        "inputs": [s.name for s in specs],
    }
    log.info("embedding %d shards from %s with model %s on %s", len(specs), data_url, ckpt.model_id, runner)
    p = test_pipeline or beam.Pipeline(options=options)
    _ = (p
         | "ReadImageShards" >> ReadImageShards(specs=specs)
         | "EmbedShards" >> EmbedShards(opts)
         | "WriteManifest" >> WriteManifest(context, so))
    watcher = ProgressWatcher(opts.partition_url, [output_name(s) for s in specs], on_progress or _log_progress, so)
    with watcher:
        result = p.run()
        try:
            result.wait_until_finish()
        finally:
            client = getattr(result, "client", None)  # Beam's DaskRunner opens a dask Client and never closes it
            if client is not None:
                client.close()
    return read_manifest(opts.partition_url, so)


def _log_progress(progress: Progress) -> None:
    log.info("%s", progress)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pipeline.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("data_url")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", dest="out_url", required=True)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--score", default="elbo", choices=list(SCORES))
    ap.add_argument("--iwae-k", type=int, default=64)
    ap.add_argument("--threshold-quantile", type=float, default=0.99)
    ap.add_argument("--run-date", default=None)
    ap.add_argument("--skip-existing", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--torch-threads", type=int, default=0)
    ap.add_argument("--storage-options", default=None)
    return ap


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None) -> dict:
    """Parse ``argv`` (our flags + any Beam flags) and run the pipeline."""
    known, beam_args = build_parser().parse_known_args(argv)
    so = parse_storage_options(known.storage_options) or None
    opts = EmbedOptions(checkpoint=known.checkpoint, out_url=known.out_url, batch_size=known.batch_size,
                        device=known.device, score=known.score, iwae_k=known.iwae_k,
                        threshold_quantile=known.threshold_quantile, run_date=known.run_date,
                        skip_existing=known.skip_existing, precision=known.precision,
                        torch_threads=known.torch_threads, storage_options=so)
    return run_embed(known.data_url, opts, beam_args, test_pipeline, use_local_cores=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    run()
