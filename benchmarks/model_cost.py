"""What the encoder costs beside the whole ELBO: the ceiling of ``--score none`` / ``--score elbo``.

For a checkpoint, on one thread, the scoring layout (``for_scoring``: eval, NHWC, fp32):

1. multiply-accumulates per image of the encoder and the decoder (forward hooks on every conv,
   transposed conv and linear layer);
2. wall time per image of ``encode`` alone and of ``elbo`` (float64 likelihood, as scoring runs
   it), medians of ``--repeats`` interleaved passes over one batch of random uint8 images, and
   the throughput in GFLOP/s each reaches.

The time ratio elbo / encode is what ``--score none`` could gain over ``--score elbo`` if reading,
decoding and writing images cost nothing.

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python benchmarks/model_cost.py --checkpoint .bench/quick.safetensors
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from vae_model.checkpoint import load_checkpoint  # noqa: E402
from vae_model.scoring import for_scoring  # noqa: E402


def macs_per_image(model) -> dict[str, int]:
    """Multiply-accumulates of one image through the encoder and the decoder."""
    counts = {"encoder": 0, "decoder": 0}

    def hook(part: str):
        def count(mod, inp, out):
            if isinstance(mod, torch.nn.Conv2d):
                k = mod.kernel_size[0] * mod.kernel_size[1]
                counts[part] += out[0].numel() * mod.in_channels // mod.groups * k
            elif isinstance(mod, torch.nn.ConvTranspose2d):  # each input pixel scatters a k x k kernel
                counts[part] += inp[0][0].numel() * mod.out_channels * mod.kernel_size[0] * mod.kernel_size[1]
            elif isinstance(mod, torch.nn.Linear):
                counts[part] += out[0].numel() * mod.in_features
        return count

    handles = [mod.register_forward_hook(hook(part)) for part in counts for mod in getattr(model, part).modules()]
    c = model.cfg
    with torch.inference_mode():
        model.elbo(torch.zeros(1, c.channels, c.image_size, c.image_size, dtype=torch.uint8),
                   eps=torch.zeros(1, c.latent_dim), precise=True)
    for h in handles:
        h.remove()
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=".bench/quick.safetensors")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", default=None, help="Write the figures as JSON here too.")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = for_scoring(load_checkpoint(args.checkpoint).model)
    c = model.cfg
    macs = macs_per_image(model)
    x = torch.randint(0, 256, (args.batch, c.channels, c.image_size, c.image_size), dtype=torch.uint8)
    x = x.contiguous(memory_format=torch.channels_last)
    eps = torch.zeros(args.batch, c.latent_dim)
    runs = {"encode": lambda: model.encode(model.prepare(x)[0]).mean,
            "elbo": lambda: model.elbo(x, eps=eps, precise=True)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.inference_mode():
        for f in runs.values():
            f()  # warm-up
        for _ in range(args.repeats):
            for name, f in runs.items():
                t = time.perf_counter()
                f()
                times[name].append((time.perf_counter() - t) / args.batch * 1e6)
    us = {k: float(np.median(v)) for k, v in times.items()}
    flops = {"encode": 2 * macs["encoder"], "elbo": 2 * (macs["encoder"] + macs["decoder"])}
    result = {
        "checkpoint": args.checkpoint, "image": [c.channels, c.image_size, c.image_size], "batch": args.batch,
        "macs_per_image": macs, "us_per_image": us,
        "gflops": {k: flops[k] / us[k] / 1e3 for k in us},
        "mac_ratio_whole_over_encoder": (macs["encoder"] + macs["decoder"]) / macs["encoder"],
        "time_ratio_elbo_over_encode": us["elbo"] / us["encode"],
    }
    print(f"{args.checkpoint}: {c.channels}x{c.image_size}x{c.image_size}, batch {args.batch}, 1 thread")
    print(f"MACs per image: encoder {macs['encoder'] / 1e6:.2f}M, decoder {macs['decoder'] / 1e6:.2f}M "
          f"(whole / encoder {result['mac_ratio_whole_over_encoder']:.2f})")
    for k in us:
        print(f"{k:7s} {us[k]:8.1f} us/image  {result['gflops'][k]:6.1f} GFLOP/s")
    print(f"elbo / encode: {result['time_ratio_elbo_over_encode']:.2f}x (the ceiling of --score none over elbo "
          "with free reading, decoding and writing)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
