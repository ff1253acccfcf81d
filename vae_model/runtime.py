"""Process tuning: settings of the Python process itself, shared by training and scoring.

Two things that no library call sets for us, each off with an environment variable and a no-op
where it does not apply. Their measured effects are in BENCHMARKS.md ("Pipeline throughput").

:func:`tune_allocator` raises glibc malloc's mmap and trim thresholds. By default glibc serves
allocations above a moving threshold (128 KiB, rising to at most 32 MiB) with fresh ``mmap``
pages and hands them back to the kernel on ``free``; a conv VAE's activations for a batch are
megabytes each, so every forward pass would page-fault them in anew. With the thresholds raised
freed activation memory is reused from the heap, as jemalloc or tcmalloc (which PyTorch's CPU
performance guide recommends preloading) would do. The cost is that up to the trim threshold of
freed memory stays mapped to the process: long-running loops call :func:`release_memory`
between units of work (the pipeline does after each shard), and :class:`HeapWatch` inside
one when the resident size has grown (a shard of any size: holes that variable-sized
buffers, such as encoded photos and their decodes, leave in the heap otherwise ratchet the
resident size up batch after batch). Together they keep the resident size flat over any number
of shards of ~1,000 photos and halve its creep inside one very large shard (BENCHMARKS.md,
"Photos: throughput"). Off with ``VAEPIPE_TUNE_MALLOC=0``; a no-op where the C library is not
glibc.

:func:`skip_exit_gc`: with torch and Beam imported, the interpreter's last garbage collection at
exit walks millions of objects, and a pipeline pays it in the driver and (one after another, as
Beam's DirectRunner stops them) in every worker process. Freezing the heap from an ``atexit``
hook skips that walk; memory goes back to the OS as the process ends. Off with
``VAEPIPE_EXIT_GC=1``.
"""
from __future__ import annotations

import atexit
import ctypes
import gc
import os
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD = 256 << 20  # bytes: larger blocks still come from mmap and go back on free

_done: bool | None = None
_libc: ctypes.CDLL | None = None
_exit_hook: bool = False


def tune_allocator() -> bool:
    """Raise glibc's mmap/trim thresholds once per process; True when they are in effect."""
    global _done, _libc
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("VAEPIPE_TUNE_MALLOC", "1") == "0" or platform.system() != "Linux" \
            or platform.libc_ver()[0] != "glibc":
        return _done
    try:
        _libc = ctypes.CDLL("libc.so.6")
        _done = bool(_libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(_libc.mallopt(M_TRIM_THRESHOLD, THRESHOLD))
    except (OSError, AttributeError):
        _done = False
    return _done


def release_memory() -> None:
    """Give the heap's free memory back to the kernel (``malloc_trim``) when tuning is in effect."""
    if _done and _libc is not None:
        _libc.malloc_trim(0)


def resident_bytes() -> int | None:
    """This process's resident set size (Linux ``/proc/self/statm``); None where unreadable."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


# The growth over a loop's working set that HeapWatch tolerates before it trims the heap. A trim
# makes the next batch fault its activations in again (~0.1 s for a few hundred MB), so it should
# be rare: a few per 1,000 photos at batch 64 (BENCHMARKS.md, "Photos: throughput").
# VAEPIPE_HEAP_SLACK_MB overrides it (0: no trims inside a loop, only between units of work).
HEAP_SLACK = 128 << 20


class HeapWatch:
    """Trim the heap inside a loop when the resident size has grown ``slack`` bytes past its working set.

    Call :meth:`check` once per unit of work (a batch). The working set is the resident size
    at the first check after a trim (the batch's buffers faulted in again); later checks trim
    when the resident size exceeds it by more than ``slack``. A no-op unless the allocator is tuned
    (:func:`tune_allocator`) and the resident size is readable.
    """

    def __init__(self, slack: int | None = None) -> None:
        if slack is None:
            try:
                slack = int(float(os.environ["VAEPIPE_HEAP_SLACK_MB"]) * 2 ** 20)
            except (KeyError, ValueError):  # unset or not a number: the default
                slack = HEAP_SLACK
        self.slack = slack
        self.working_set: int | None = None
        self.trims = 0

    def check(self) -> bool:
        """Trim if the resident size grew past the working set + slack; True when it did."""
        if not _done or self.slack <= 0:
            return False
        rss = resident_bytes()
        if rss is None:
            return False
        if self.working_set is None:
            self.working_set = rss
            return False
        if rss <= self.working_set + self.slack:
            return False
        self.release()
        self.trims += 1
        return True

    def release(self) -> None:
        """Trim the heap now (:func:`release_memory`, e.g. between units of work); the working set is
        measured again at the next check, once the next batch has run."""
        release_memory()
        self.working_set = None


def skip_exit_gc() -> bool:
    """Skip the final cyclic garbage collection when this process exits; True when in effect.

    Only the cycle collector's walk over the heap is skipped: files and writers are closed
    explicitly everywhere in vaepipe, and ``atexit`` handlers registered earlier (logging's
    flush, Beam's, Dask's) still run after this one.
    """
    global _exit_hook
    if os.environ.get("VAEPIPE_EXIT_GC", "0") == "1":
        return False
    if not _exit_hook:
        atexit.register(gc.freeze)
        _exit_hook = True
    return True
