"""Decode speed and the fast path's row difference, on real photographs, on one core.

Two measurements, one run (``python benchmarks/decode_speed.py``; raw JSON in
``benchmarks/results/decode_speed.json``):

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
from pipeline.decode import DRAFT_FACTOR, REDUCING_GAP, decode_image, decode_with  # noqa: E402

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
    speed, tol = [], []
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
            if side in (1000, 2000):
                blobs = blobs[:a.tolerance_n]
                pngs = reencode(blobs, "PNG")
                measure("PNG", pngs)  # the other formats' fast path: speed of a lossless PNG of the same photos
                for fmt, data in (("JPEG", blobs), ("PNG", pngs), ("WEBP", reencode(blobs, "WEBP"))):
                    for row in tolerance(data, fmt):
                        tol.append({"source_short_side": side, **row})
                        print(json.dumps(tol[-1]), flush=True)
    import PIL

    result = {"speed": speed, "tolerance": tol, "repeats": a.repeats, "threads": 1, "clock": "process_time",
              "naive": "Image.open(BytesIO(b)).convert('RGB') + ImageOps.fit(img, (s, s), BICUBIC)",
              "vaepipe": "pipeline.decode.decode_image(b, 3, s) (center-crop)",
              "pillow": PIL.__version__, "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
              "date": time.strftime("%Y-%m-%d")}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
