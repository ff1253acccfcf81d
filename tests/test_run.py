"""pipeline.runner_args: the local-parallelism default (the runs themselves are in test_embed.py)."""
import os

import pytest

from pipeline import runner_args as run
from pipeline.runner_args import MAX_LOCAL_WORKERS, local_parallelism_args


@pytest.fixture
def cpu_box(monkeypatch):
    """Pretend to be a CPU-only machine with 4 cores (the policy reads only these two facts)."""
    monkeypatch.setattr(run, "cores", lambda: 4)
    monkeypatch.setattr(run, "gpu_present", lambda: False)


def test_direct_runner_gets_a_worker_per_core(cpu_box):
    want = ["--direct_num_workers=4", "--direct_running_mode=multi_processing"]
    assert local_parallelism_args([], 10) == want
    assert local_parallelism_args(["--runner=DirectRunner"], 10) == want
    assert local_parallelism_args(["--runner", "DirectRunner"], 10) == want
    assert local_parallelism_args([], 3) == ["--direct_num_workers=3", "--direct_running_mode=multi_processing"]


def test_explicit_settings_other_runners_and_gpus_are_left_alone(cpu_box, monkeypatch):
    assert local_parallelism_args(["--direct_num_workers=1"], 10) == []
    assert local_parallelism_args(["--direct_running_mode=in_memory"], 10) == []
    assert local_parallelism_args(["--runner=FlinkRunner"], 10) == []
    assert local_parallelism_args(["--runner", "apache_beam.runners.dask.dask_runner.DaskRunner"], 10) == []
    assert local_parallelism_args([], 1) == []  # one shard: one process, no start-up cost
    assert local_parallelism_args([], 10, device="cuda") == []
    monkeypatch.setattr(run, "gpu_present", lambda: True)
    assert local_parallelism_args([], 10) == []
    assert local_parallelism_args([], 10, device="cpu") != []


def test_worker_count_is_capped(monkeypatch):
    monkeypatch.setattr(run, "cores", lambda: 64)
    monkeypatch.setattr(run, "gpu_present", lambda: False)
    assert local_parallelism_args([], 1000)[0] == f"--direct_num_workers={MAX_LOCAL_WORKERS}"


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs CPU affinity and 2+ cores")
def test_a_process_pinned_to_one_core_runs_one_worker():
    """Under taskset/cpusets the count follows the cores the process may use, not the machine's."""
    import subprocess
    import sys

    script = ("import json, os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
              "from pipeline import runner_args as run; run.gpu_present = lambda: False; "
              "print(json.dumps(run.local_parallelism_args([], 10)))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
