"""Beam flags of an embed run: which flags exist, and the ones vaepipe adds for the runner in use.

* :func:`check_beam_flags` refuses a flag that neither vaepipe nor any registered Beam option
  knows (Beam only warns and runs on: a mistyped ``--run_date`` would write outside its
  ``dt=`` partition), with a "did you mean" hint.
* :func:`local_parallelism_args`: on the DirectRunner on a CPU machine, one worker process per
  core instead of Beam's single process.
* :func:`dask_args`: one Dask partition per shard, so shards spread over the cluster.

Torch-free: the driver imports this.
"""
from __future__ import annotations

import difflib
import importlib
import os

from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from vae_model.device import expected_device_type
from vae_model.errors import ConfigError

MAX_LOCAL_WORKERS = 8  # each CPU worker process holds a model and its buffers (~0.7 GB RSS here)


def cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. under taskset or a cpuset)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def gpu_present() -> bool:
    """An NVIDIA GPU on this machine? A cheap check that imports nothing (the driver has no torch)."""
    return os.path.exists("/proc/driver/nvidia/gpus") or os.path.exists("/dev/nvidia0")


def runner_name(beam_args: list[str]) -> str:
    return str(PipelineOptions(beam_args).view_as(StandardOptions).runner or "DirectRunner")


def _is_direct(runner: str) -> bool:
    return runner.rsplit(".", 1)[-1].lower() in ("directrunner", "direct")


def _beam_parser(beam_args: list[str]):
    from apache_beam.options.pipeline_options import _BeamArgumentParser

    runner = runner_name(beam_args)
    if "." in runner:  # a runner named by its full path registers its options when imported
        module = runner.rsplit(".", 1)[0]
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"--runner={runner}: cannot import {module} ({exc})") from None
    parser = _BeamArgumentParser(allow_abbrev=False)
    for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(parser)  # what PipelineOptions.get_all_options does
    return parser


def _normal(flag: str) -> str:
    return flag.split("=", 1)[0].lstrip("-").replace("_", "-").lower()


def check_beam_flags(beam_args: list[str], own_flags: tuple[str, ...] | list[str] = ()) -> None:
    """Raise :class:`ConfigError` for the first flag in ``beam_args`` that no registered Beam
    option knows; ``own_flags`` (vaepipe's, e.g. ``--run-date``) feed the "did you mean" hint."""
    parser = _beam_parser(beam_args)
    try:
        _, unknown = parser.parse_known_args(beam_args)
    except SystemExit:  # argparse has printed why (a bad value of a Beam flag)
        raise ConfigError(f"invalid Beam option in {' '.join(beam_args)}") from None
    bad = [a for a in unknown if a.startswith("-") and a != "--"]
    if not bad:
        return
    flag = bad[0].split("=", 1)[0]
    beam_flags = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
    known = {_normal(f): f for f in [*beam_flags, *own_flags]}
    target = _normal(flag)
    if target in known:
        hint = f" (did you mean {known[target]}?)"
    else:
        close = difflib.get_close_matches(target, list(known), n=1, cutoff=0.75)
        hint = f" (did you mean {known[close[0]]}?)" if close else ""
    raise ConfigError(f"unknown option {flag}{hint}: neither vaepipe nor Beam knows it")


def local_parallelism_args(beam_args: list[str], n_shards: int, device: str = "auto") -> list[str]:
    """Beam flags that spread a local (DirectRunner) CPU run over this machine's cores.

    Beam's DirectRunner default is one process; ``vaepipe embed`` on a CPU machine defaults
    to ``min(cores, shards, 8)`` worker processes instead (each gets cores / workers torch
    threads; measured in BENCHMARKS.md). Nothing is added when the flags name another runner or
    any ``--direct_*`` setting, when a GPU will score (one process feeds it), or when there is a
    single shard or core.
    """
    if any(a.startswith(("--direct_num_workers", "--direct_running_mode")) for a in beam_args):
        return []
    if not _is_direct(runner_name(beam_args)):
        return []
    if expected_device_type(device, gpu_present()) == "cuda":
        return []
    workers = min(cores(), n_shards, MAX_LOCAL_WORKERS)
    if workers < 2:
        return []
    return [f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"]


def dask_args(beam_args: list[str], n_shards: int) -> list[str]:
    """Beam's DaskRunner puts up to 128 elements in one partition by default, so a run of a few
    shards would use one worker; one partition per shard spreads them over the cluster."""
    if "DaskRunner" in runner_name(beam_args) and not any(a.startswith("--dask_npartitions") for a in beam_args):
        return [f"--dask_npartitions={max(1, n_shards)}"]
    return []


def threads_per_worker(options: PipelineOptions) -> int:
    """Torch threads per worker that avoid oversubscription: the cores split among DirectRunner
    worker processes; 0 (torch's default) elsewhere."""
    direct = options.view_as(DirectOptions)
    if (direct.direct_running_mode or "") == "multi_processing":
        workers = direct.direct_num_workers or 1
        if workers <= 0:  # Beam then starts one worker per CPU it counts
            workers = os.cpu_count() or 1
        return max(1, cores() // workers)
    return 0
