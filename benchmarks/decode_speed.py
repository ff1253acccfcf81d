"""Decode speed and the fast path's row difference, on real photographs, on one core.

Two measurements, one run (``python benchmarks/decode_speed.py``, best pinned to one core:
``taskset -c 1``; raw JSON in ``benchmarks/results/decode_speed.json``, with the CPU model, the cores
the process could use and the load averages at the start and the end):

1. **Speed**: images per CPU-second (one thread: images/s of one core) decoding JPEG photos
   whose short side is about 300, 1000 and 2000 px (``benchmarks/photoset.py sources``: crops of
   mvtb-data / scikit-image photographs, quality 90) to 64 and 128 px RGB, single-threaded,
   medians of ``--repeats`` passes over the same bytes:

   * *naive*: Pillow as a user writes it: ``Image.open(io.BytesIO(b)).convert("RGB")`` then
     ``ImageOps.fit(img, (s, s), Image.Resampling.BICUBIC)`` (shorter side to ``s``, centre crop);
   * *vaepipe*: :func:`pipeline.decode.decode_image` (``--resize center-crop``: DCT draft, resize of
     the kept region only, antialiased bicubic).

   CPU time rather than wall time, so that other processes on the machine do not count; passes
   of the two alternate. A lossless
   PNG of the 1000 and 2000 px photos is timed too (no DCT draft there: ``reducing_gap`` only).

   Where the time goes (``stages``): the same photos at 1000 px -> 64 px, per image, one core:
   vaepipe's header/draft setup, DCT-scaled decode (``load``), bicubic resize of the kept region,
   and the rest of :func:`pipeline.decode.decode_image` (checks, conversion, numpy), against the
   naive path's full decode, ``convert`` and ``ImageOps.fit``.

2. **Tolerance**: mean and max absolute row difference (grey levels, over every pixel and
   channel) of the fast path against the exact path (full decode, one resize:
   ``decode_with(draft_factor=None, reducing_gap=None)``) for JPEG draft factors 1, 2 and 4, and
   for PNG / lossless WebP encodings of the same photos with ``reducing_gap`` 2, 4 and 8.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one core: before numpy is imported

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

import photoset  # noqa: E402  (benchmarks/photoset.py)
from pipeline.decode import DRAFT_FACTOR, REDUCING_GAP, _fit, _resized_dims, decode_image, decode_with  # noqa: E402

SIDES = (300, 1000, 2000)
TARGETS = (64, 128)
DRAFT_FACTORS = (1, 2, 4)
REDUCING_GAPS = (2.0, 4.0, 8.0)


def naive(data: bytes, s: int) -> np.ndarray:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    return np.asarray(ImageOps.fit(img, (s, s), Image.Resampling.BICUBIC))


def ours(data: bytes, s: int) -> np.ndarray:
    return decode_image(data, 3, s)


def images_per_s(fns, blobs: list[bytes], s: int, repeats: int) -> list[float]:
    """Images per CPU-second of each function (this process's CPU time: one thread, so one core's
    work, whatever else the machine runs), passes interleaved."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t = time.process_time()
            for b in blobs:
                fn(b, s)
            ts.append(time.process_time() - t)
    return [len(blobs) / statistics.median(ts) for ts in times]


def stages(blobs: list[bytes], s: int, repeats: int) -> dict:
    """Milliseconds of CPU per image in each stage of both paths (medians over ``repeats`` passes;
    vaepipe's stages replay :func:`pipeline.decode.decode_with` for a JPEG, center-crop, RGB)."""
    clock = time.process_time
    passes: list[dict[str, float]] = []
    for _ in range(repeats):
        acc = dict.fromkeys(("vaepipe_open_draft", "vaepipe_decode", "vaepipe_resize", "vaepipe_total",
                             "naive_decode", "naive_convert", "naive_fit", "naive_total"), 0.0)
        for b in blobs:
            t0 = clock()
            img = Image.open(io.BytesIO(b))
            w, h = img.size
            tw, th = _resized_dims(w, h, s, "center-crop")
            drafted = img.draft(img.mode, (DRAFT_FACTOR * tw, DRAFT_FACTOR * th))
            scale = round(w / drafted[1][2]) if drafted else 1
            img.getexif()
            t1 = clock()
            img.load()
            t2 = clock()
            np.asarray(_fit(img, (w, h), scale, s, "center-crop", REDUCING_GAP))
            t3 = clock()
            decode_image(b, 3, s)
            t4 = clock()
            img = Image.open(io.BytesIO(b))
            img.load()
            t5 = clock()
            img = img.convert("RGB")
            t6 = clock()
            np.asarray(ImageOps.fit(img, (s, s), Image.Resampling.BICUBIC))
            del img  # freeing the full-size image is the naive path's cost (counted in its fit)
            t7 = clock()
            for k, v in (("vaepipe_open_draft", t1 - t0), ("vaepipe_decode", t2 - t1), ("vaepipe_resize", t3 - t2),
                         ("vaepipe_total", t4 - t3), ("naive_decode", t5 - t4), ("naive_convert", t6 - t5),
                         ("naive_fit", t7 - t6)):
                acc[k] += v
            acc["naive_total"] += t7 - t4
        passes.append(acc)
    ms = {k: round(1e3 * statistics.median(p[k] for p in passes) / len(blobs), 3) for k in passes[0]}
    ms["vaepipe_rest"] = round(ms["vaepipe_total"] - ms["vaepipe_open_draft"] - ms["vaepipe_decode"] - ms["vaepipe_resize"], 3)
    return {"source_short_side": 1000, "target": s, "images": len(blobs), "ms_per_image": ms}


def box() -> dict:
    """What the numbers were measured on: CPU model, the cores this process may run on, load averages."""
    model = ""
    try:
        model = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                     if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu_model": model or platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "loadavg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}


def diff_stats(fast: list[np.ndarray], exact: list[np.ndarray]) -> dict:
    d = [np.abs(a.astype(np.int16) - b.astype(np.int16)) for a, b in zip(fast, exact)]
    return {"mean_abs": round(float(np.mean([x.mean() for x in d])), 3),
            "worst_image_mean_abs": round(float(max(x.mean() for x in d)), 3),
            "max_abs": int(max(x.max() for x in d))}


def tolerance(blobs: list[bytes], fmt: str) -> list[dict]:
    rows = []
    for s in TARGETS:
        exact = [decode_with(b, 3, s, draft_factor=None, reducing_gap=None) for b in blobs]
        if fmt == "JPEG":
            for f in DRAFT_FACTORS:
                fast = [decode_with(b, 3, s, draft_factor=f, reducing_gap=None) for b in blobs]
                rows.append({"format": fmt, "target": s, "draft_factor": f, **diff_stats(fast, exact)})
        fast = [decode_image(b, 3, s) for b in blobs]  # what ships: DRAFT_FACTOR and REDUCING_GAP together
        rows.append({"format": fmt, "target": s, "shipped": True, "draft_factor": DRAFT_FACTOR,
                     "reducing_gap": REDUCING_GAP, **diff_stats(fast, exact)})
        if fmt != "JPEG":
            for g in REDUCING_GAPS:
                fast = [decode_with(b, 3, s, reducing_gap=g) for b in blobs]
                rows.append({"format": fmt, "target": s, "reducing_gap": g, **diff_stats(fast, exact)})
    return rows


def reencode(blobs: list[bytes], fmt: str) -> list[bytes]:
    out = []
    for b in blobs:
        buf = io.BytesIO()
        kw = {"lossless": True, "method": 0} if fmt == "WEBP" else {"compress_level": 1}
        Image.open(io.BytesIO(b)).convert("RGB").save(buf, format=fmt, **kw)
        out.append(buf.getvalue())
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=24, help="photos per source size")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tolerance-n", type=int, default=12, help="photos (1000 and 2000 px) for the tolerance table")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "decode_speed.json")
    a = ap.parse_args(argv)
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    speed, tol, profile = [], [], {}
    box_at_start = box()
    with tempfile.TemporaryDirectory() as tmp:
        for side in SIDES:
            paths = photoset.sources_at(Path(tmp) / str(side), side, a.n)
            blobs = [p.read_bytes() for p in paths]
            def measure(fmt: str, data: list[bytes], side: int = side) -> None:
                for s in TARGETS:
                    r_naive, r_ours = images_per_s((naive, ours), data, s, a.repeats)
                    row = {"source_short_side": side, "target": s, "format": fmt, "images": len(data),
                           "naive_img_s": round(r_naive, 1), "vaepipe_img_s": round(r_ours, 1),
                           "ratio": round(r_ours / r_naive, 2)}
                    speed.append(row)
                    print(json.dumps(row), flush=True)

            measure("JPEG", blobs)
            if side == 1000:
                profile = stages(blobs, 64, a.repeats)
                print(json.dumps(profile), flush=True)
            if side in (1000, 2000):
                blobs = blobs[:a.tolerance_n]
                pngs = reencode(blobs, "PNG")
                measure("PNG", pngs)  # the other formats' fast path: speed of a lossless PNG of the same photos
                for fmt, data in (("JPEG", blobs), ("PNG", pngs), ("WEBP", reencode(blobs, "WEBP"))):
                    for row in tolerance(data, fmt):
                        tol.append({"source_short_side": side, **row})
                        print(json.dumps(tol[-1]), flush=True)
    import PIL

    result = {"speed": speed, "stages": profile, "tolerance": tol, "repeats": a.repeats, "threads": 1, "clock": "process_time",
              "naive": "Image.open(BytesIO(b)).convert('RGB') + ImageOps.fit(img, (s, s), BICUBIC)",
              "vaepipe": "pipeline.decode.decode_image(b, 3, s) (center-crop)",
              "pillow": PIL.__version__, "python": platform.python_version(), "box_at_start": box_at_start,
              "box_at_end": box(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
