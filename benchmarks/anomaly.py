"""Anomaly-detection benchmark, scored through ``vaepipe embed`` (pipeline.run.run_embed).

    python benchmarks/anomaly.py --checkpoint .bench/likelihood/fashion-8bit-full.safetensors
    python benchmarks/anomaly.py --quick

Case 1 (out of distribution): a model trained on Fashion-MNIST train (8-bit likelihood); normal =
Fashion-MNIST test, anomalous = MNIST test. Plain likelihoods fail here (Nalisnick et al. 2019).
Case 2 (in distribution): a model trained on Fashion-MNIST train without one class; normal = the
other test classes, anomalous = the held-out class.
For every score the pipeline offers: AUROC, AUPRC, FPR at 95% TPR, and the scoring cost (sum of
per-shard seconds from the manifests, same run) relative to plain ELBO scoring.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402
from ood_metrics import auprc, auroc, fpr_at_tpr  # noqa: E402

from jobs.train import TrainConfig, train  # noqa: E402
from pipeline.idx import read_idx  # noqa: E402
from pipeline.options import EmbedOptions  # noqa: E402
from pipeline.run import run_embed  # noqa: E402
from pipeline.shards import write_shards  # noqa: E402

BENCH = ROOT / ".bench" / "anomaly"
FASHION = Path("/usr/share/datasets/fashion-mnist")
MNIST = Path("/tmp/mnist/package/data")
SCORES = ("elbo", "iwae", "complexity", "typicality")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]


def _write_idx(path: Path, arr: np.ndarray) -> None:
    hdr = struct.pack(">I", 0x800 | arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.GzipFile(path, "wb", mtime=0) as f:
        f.write(hdr + arr.astype(np.uint8).tobytes())


def shards(src: Path, name: str, limit: int | None) -> str:
    return str(common.build_once(BENCH / name, lambda d: write_shards(str(src), str(d), fmt="tar", shard_size=2500,
                                                                       limit=limit)))


def without_class(holdout: int) -> Path:
    """Fashion-MNIST train minus one class, as an IDX pair (labels kept)."""
    imgs = read_idx(str(FASHION / "train-images-idx3-ubyte.gz"))
    labels = read_idx(str(FASHION / "train-labels-idx1-ubyte.gz"))
    keep = labels != holdout
    d = BENCH / f"idx-no{holdout}"
    d.mkdir(parents=True, exist_ok=True)
    img_path = d / "train-images-idx3-ubyte.gz"
    if not img_path.exists():
        _write_idx(img_path, imgs[keep])
        _write_idx(d / "train-labels-idx1-ubyte.gz", labels[keep])
    return img_path


def train_model(data: str, out: Path, budget: float) -> str:
    if not common.trained(out):
        train(TrainConfig(data_url=data, out=str(out), epochs=1000, time_limit=budget, patience=1000,
                          batch_size=128, lr_schedule="cosine", val_fraction=0.1, quantile_images=10000,
                          quantile_iwae_k=16,
                          model=dict(latent_dim=32, widths=(32, 64), hidden_dim=512)), progress=False)
    return str(out)


def score(data: str, ckpt: str, name: str, score: str, iwae_k: int) -> tuple[pd.DataFrame, float]:
    out = BENCH / "out" / f"{name}-{score}"
    m = run_embed(data, EmbedOptions(ckpt, str(out), score=score, iwae_k=iwae_k, batch_size=256,
                                     skip_existing=False),
                  ["--direct_num_workers=1"])
    assert m["reconciled"], m
    df = pd.concat([pd.read_parquet(p) for p in sorted(out.glob("*.parquet"))])
    return df, sum(s["seconds"] for s in m["shards"])


def metrics(normal: np.ndarray, anomalous: np.ndarray) -> dict:
    return {"auroc": auroc(normal, anomalous), "auprc": auprc(normal, anomalous),
            "fpr_at_95_tpr": fpr_at_tpr(normal, anomalous, 0.95)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--checkpoint", default=None, help="Fashion-MNIST model (else trained here)")
    ap.add_argument("--budget", type=float, default=420.0, help="training seconds per model trained here")
    ap.add_argument("--holdout", type=int, default=8, help="Fashion-MNIST class held out in case 2")
    ap.add_argument("--iwae-k", type=int, default=16)
    ap.add_argument("--skip-case2", action="store_true")
    args = ap.parse_args()
    BENCH.mkdir(parents=True, exist_ok=True)
    limit = 2500 if args.quick else None
    budget = 60.0 if args.quick else args.budget
    tag = "quick" if args.quick else "full"
    f_test = shards(FASHION / "t10k-images-idx3-ubyte.gz", f"fashion-test-{tag}", limit)
    m_test = shards(MNIST / "t10k-images-idx3-ubyte", f"mnist-test-{tag}", limit)
    ckpt = args.checkpoint or train_model(shards(FASHION / "train-images-idx3-ubyte.gz", f"fashion-train-{tag}",
                                                 10000 if args.quick else None),
                                          BENCH / f"fashion-{tag}.safetensors", budget)
    results = {"case1": {}, "case2": {}}
    for s in SCORES:
        f_df, f_cost = score(f_test, ckpt, "fashion", s, args.iwae_k)
        m_df, m_cost = score(m_test, ckpt, "mnist", s, args.iwae_k)
        results["case1"][s] = {**metrics(f_df["anomaly_score"].to_numpy(), m_df["anomaly_score"].to_numpy()),
                               "scoring_seconds": f_cost + m_cost, "images": len(f_df) + len(m_df)}
    base = results["case1"]["elbo"]["scoring_seconds"]
    for s in SCORES:
        results["case1"][s]["cost_vs_elbo"] = results["case1"][s]["scoring_seconds"] / base
    if not args.skip_case2:
        src = without_class(args.holdout)
        ck2 = train_model(shards(src, f"fashion-train-no{args.holdout}-{tag}", 10000 if args.quick else None),
                          BENCH / f"fashion-no{args.holdout}-{tag}.safetensors", budget)
        for s in SCORES:
            df, _ = score(f_test, ck2, f"heldout{args.holdout}", s, args.iwae_k)
            held = df["label"] == args.holdout
            results["case2"][s] = metrics(df.loc[~held, "anomaly_score"].to_numpy(),
                                          df.loc[held, "anomaly_score"].to_numpy())
    print("case 1: Fashion-MNIST (normal) vs MNIST (anomalous), scored through vaepipe embed")
    print(f"{'score':12} {'AUROC':>7} {'AUPRC':>7} {'FPR@95':>7} {'cost/elbo':>9}")
    for s, r in results["case1"].items():
        print(f"{s:12} {r['auroc']:7.4f} {r['auprc']:7.4f} {r['fpr_at_95_tpr']:7.4f} {r['cost_vs_elbo']:9.2f}")
    if results["case2"]:
        print(f"case 2: Fashion-MNIST, class {args.holdout} ({FASHION_CLASSES[args.holdout]}) held out of training")
        for s, r in results["case2"].items():
            print(f"{s:12} {r['auroc']:7.4f} {r['auprc']:7.4f} {r['fpr_at_95_tpr']:7.4f}")
    out = ROOT / "benchmarks" / "results" / f"anomaly{'-quick' if args.quick else ''}.json"
    out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                               "checkpoint": ckpt, "iwae_k": args.iwae_k, "holdout": args.holdout,
                               "results": results, "when": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
