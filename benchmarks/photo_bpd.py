"""Test bits/dim on the photo set: vaepipe checkpoints against lossless image coders.

Every figure is measured on exactly the pixels the model scores: each test photo decoded by
vaepipe's decode policy (``pipeline.decode.decode_image``, centre crop) at the model's size. The
coders compress those uint8 arrays one image at a time, and their bits/dim is
``8 * file bytes / (3 * size * size)`` (headers included: what storing each image costs):

* PNG: Pillow, ``optimize=True`` (zlib level 9 with filter search);
* WebP lossless: Pillow/libwebp, ``lossless=True, quality=100, method=6`` (its slowest, best mode).

The models' figures are the test set's mean negative ELBO and IWAE-k bound in bits/dim
(``jobs.evaluate``; both are upper bounds on the model's true code length, the IWAE one tighter).

    python benchmarks/photo_bpd.py --test .bench/photos/test --size 32 \\
        --model new-60min=runs/mix32/model.safetensors --model current-30min=runs/plain32/model.safetensors
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.decode import decode_image  # noqa: E402
from vae_model.scoring import compressed_bits  # noqa: E402


def coder_bits_per_dim(files: list[Path], size: int) -> dict[str, float]:
    sums = {"png": 0.0, "webp_lossless": 0.0}
    for f in files:
        img = decode_image(f.read_bytes(), 3, size)
        sums["png"] += compressed_bits(img, "png")
        sums["webp_lossless"] += compressed_bits(img, "webp", webp_method=6)
    dims = 3 * size * size * len(files)
    return {name: total / dims for name, total in sums.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--test", required=True, help="folder of test photos (photoset.py's test/)")
    ap.add_argument("--shards", default=None, help="the same photos as shards (vaepipe shards), for the models")
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--model", action="append", default=[], metavar="LABEL=CHECKPOINT")
    ap.add_argument("--iwae-k", type=int, default=16)
    ap.add_argument("--no-coders", action="store_true", help="models only (the coders' figures do not change)")
    ap.add_argument("--out", default=None, help="JSON results file")
    a = ap.parse_args()
    files = sorted(Path(a.test).glob("*.jpg"))
    t0 = time.perf_counter()
    result = {"size": a.size, "test_images": len(files),
              "coders": None if a.no_coders else coder_bits_per_dim(files, a.size),
              "coder_seconds": round(time.perf_counter() - t0, 1), "models": {}}
    print(json.dumps(result["coders"]))
    if a.model:
        import torch

        from jobs.evaluate import EvalOptions, evaluate
        from vae_model.checkpoint import load_checkpoint

        torch.set_num_threads(1)
        for spec in a.model:
            label, url = spec.split("=", 1)
            ckpt = load_checkpoint(url)
            if ckpt.config.image_size != a.size:
                raise SystemExit(f"{url} is a {ckpt.config.image_size} px model; --size is {a.size}")
            r = evaluate(a.shards or a.test, url, EvalOptions(iwae_k=a.iwae_k, batch_size=128))
            meta = ckpt.meta or {}
            r.update(config=ckpt.config.to_dict(), train_epochs=meta.get("epochs"), train_steps=meta.get("steps"))
            result["models"][label] = r
            print(json.dumps({label: {k: r[k] for k in ("images", "elbo_bits_per_dim", "bits_per_dim", "iwae_k")}}))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
