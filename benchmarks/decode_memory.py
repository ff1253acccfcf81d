"""Peak memory of decoding hostile images: one fresh process per image, its peak RSS (VmHWM) after
``pipeline.decode.decode_image`` returns (or refuses), side by side with a plain Pillow decode
of the same file (``Image.open(...).convert("L")``), the cost without vaepipe's bounds.

    python benchmarks/decode_memory.py [--quick]

Images (made here, tiny on disk): a 13000 x 13000 RGBA PNG of ~0.7 MB (the adversarial review's
case: under Pillow's bomb limit), a 6300 x 6300 RGBA PNG (39.7 Mpx, just under vaepipe's default
40 Mpx limit) and a 6000 x 4000 JPEG photo-sized image (drafted while decoding). Results: JSON to
benchmarks/results/decode_memory.json and a table on stdout.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

PROBE = r"""
import sys, time, json
sys.path.insert(0, sys.argv[1])
from PIL import Image
mode, path, max_pixels = sys.argv[2], sys.argv[3], int(sys.argv[4])
data = open(path, "rb").read()
t0 = time.perf_counter()
outcome = "decoded"
if mode == "vaepipe":
    from pipeline.decode import decode_image
    from vae_model.errors import ImageDecodeError
    try:
        decode_image(data, 1, 28, max_pixels=max_pixels)
    except ImageDecodeError as exc:
        outcome = getattr(exc, "error_type", "ImageDecodeError")
else:
    import io
    Image.MAX_IMAGE_PIXELS = None
    img = Image.open(io.BytesIO(data)); img.load(); img.convert("L").resize((28, 28))
secs = time.perf_counter() - t0
# VmHWM: this process's own peak (ru_maxrss would include the parent's RSS at fork time)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"outcome": outcome, "seconds": secs, "peak_rss_mb": hwm / 1024}))
"""


def _images(folder: Path, quick: bool) -> dict[str, Path]:
    out = {}
    rng = np.random.default_rng(0)
    sizes = [("rgba-png-6300", 6300)] if quick else [("rgba-png-13000", 13000), ("rgba-png-6300", 6300)]
    for name, side in sizes:
        img = Image.new("RGBA", (side, side), (255, 0, 0, 128))  # compresses to almost nothing
        img.paste((0, 0, 255, 255), (side // 4, side // 4, side // 2, side // 2))
        path = folder / f"{name}.png"
        img.save(path, optimize=False, compress_level=9)
        out[name] = path
    smooth = np.linspace(0, 255, 6000, dtype=np.float32)[None, :, None] * np.ones((4000, 1, 3), np.float32)
    noisy = np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)
    path = folder / "jpeg-6000x4000.jpg"
    Image.fromarray(noisy).save(path, quality=90)
    out["jpeg-6000x4000"] = path
    return out


def _probe(mode: str, path: Path, max_pixels: int) -> dict:
    res = subprocess.run([sys.executable, "-c", PROBE, str(REPO), mode, str(path), str(max_pixels)],
                         capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        return {"outcome": f"failed: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller images only (a smoke test)")
    args = ap.parse_args()
    from pipeline.options import DEFAULT_MAX_PIXELS

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in _images(Path(tmp), args.quick).items():
            with Image.open(path) as img:
                w, h = img.size
            for mode, limit in (("pillow", 0), ("vaepipe", DEFAULT_MAX_PIXELS), ("vaepipe", 2 ** 40)):
                r = _probe(mode, path, limit)
                limit_name = "default" if limit == DEFAULT_MAX_PIXELS else "unlimited"
                label = mode if mode == "pillow" else f"vaepipe --max-pixels {limit_name}"
                rows.append({"image": name, "pixels": w * h, "file_kb": round(path.stat().st_size / 1024),
                             "decoder": label, **r})
                print(f"{name:16s} {w * h / 1e6:6.1f} Mpx {path.stat().st_size / 1024:7.0f} KB  {label:34s} "
                      f"{r.get('outcome'):14s} {r.get('peak_rss_mb', float('nan')):8.0f} MB "
                      f"{r.get('seconds', float('nan')):6.2f} s",
                      flush=True)
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / "decode_memory.json").write_text(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M"),
                                                            "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
