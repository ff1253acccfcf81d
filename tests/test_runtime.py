"""vae_model.runtime: the allocator setting takes effect in a real process (glibc's own counters)."""
import os
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc only")

# mallinfo2().hblkhd: bytes in mmapped blocks. A 40 MB tensor is above glibc's default mmap
# threshold (at most 32 MiB), so without tuning it is mmapped; tuned, it comes from the heap.
PROBE = textwrap.dedent("""
    import ctypes, json, sys
    import torch
    from vae_model.runtime import tune_allocator

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    tuned = tune_allocator()
    before = libc.mallinfo2().hblkhd
    x = torch.empty(10_000_000, dtype=torch.float32)  # 40 MB
    x.fill_(1.0)
    during = libc.mallinfo2().hblkhd
    print(json.dumps({"tuned": tuned, "again": tune_allocator(), "mmapped_growth": during - before}))
""")


def _probe(env_value: str | None, script: str = PROBE) -> dict:
    """Run a script in a fresh interpreter (the allocator is per process); its last line is JSON."""
    import json
    env = {k: v for k, v in os.environ.items() if k != "VAEPIPE_TUNE_MALLOC"}
    if env_value is not None:
        env["VAEPIPE_TUNE_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tuned_process_serves_large_tensors_from_the_heap():
    r = _probe(None)
    assert r["tuned"] is True and r["again"] is True
    assert r["mmapped_growth"] < 1_000_000  # the 40 MB block is not an mmap of its own


def test_opt_out_leaves_glibc_defaults():
    r = _probe("0")
    assert r["tuned"] is False
    assert r["mmapped_growth"] >= 40_000_000  # glibc's default: its own mmap


RELEASE = textwrap.dedent("""
    import json, os
    import torch
    from vae_model.runtime import release_memory, tune_allocator

    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    assert tune_allocator()
    x = torch.empty(10_000_000, dtype=torch.float32)
    x.fill_(1.0)  # 40 MB touched, on the heap
    del x
    kept = rss()
    release_memory()
    print(json.dumps({"freed": kept - rss()}))
""")


def test_release_memory_hands_freed_heap_back():
    assert _probe(None, RELEASE)["freed"] >= 30_000_000


# atexit runs handlers last-registered-first: this one, registered before skip_exit_gc's,
# runs after it and sees whether the heap was frozen (the final collection then skips it).
EXIT = textwrap.dedent("""
    import atexit, gc, json
    atexit.register(lambda: print(json.dumps({"frozen": gc.get_freeze_count(), "on": on})))
    import torch  # a heap worth skipping
    from vae_model.runtime import skip_exit_gc
    on = skip_exit_gc() and skip_exit_gc()
""")


@pytest.mark.parametrize("value, frozen", [(None, True), ("1", False)])
def test_skip_exit_gc_freezes_the_heap_at_exit(value, frozen):
    import json
    env = {k: v for k, v in os.environ.items() if k != "VAEPIPE_EXIT_GC"}
    if value is not None:
        env["VAEPIPE_EXIT_GC"] = value
    out = subprocess.run([sys.executable, "-c", EXIT], env=env, capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["on"] is frozen
    assert (r["frozen"] > 100_000) is frozen  # torch alone leaves hundreds of thousands of objects


WATCH = textwrap.dedent("""
    import json
    import torch
    from vae_model.runtime import HeapWatch, resident_bytes, tune_allocator

    assert tune_allocator()
    watch = HeapWatch(slack=32 << 20)
    first = watch.check()                  # measures the working set
    steady = watch.check()                 # nothing grew
    kept = [torch.ones(2_000_000) for _ in range(3)]   # 24 MB kept: the working set
    junk = [torch.ones(1_000_000 + 1000 * i) for i in range(64)]  # ~256 MB freed, left mapped
    del junk
    grown = resident_bytes()
    trimmed = watch.check()
    after = resident_bytes()
    remeasure = watch.check()              # the next check measures the working set again
    print(json.dumps({"first": first, "steady": steady, "trimmed": trimmed, "released": grown - after,
                      "remeasure": remeasure, "trims": watch.trims, "kept": len(kept)}))
""")


def test_heap_watch_trims_only_past_its_slack():
    r = _probe(None, WATCH)
    assert (r["first"], r["steady"], r["trimmed"], r["remeasure"]) == (False, False, True, False)
    assert r["trims"] == 1 and r["released"] >= 200_000_000


def test_heap_watch_is_off_with_the_default_allocator():
    script = WATCH.replace("assert tune_allocator()", "assert not tune_allocator()")
    r = _probe("0", script.replace('"released": grown - after,', ""))
    assert r["trimmed"] is False and r["trims"] == 0
