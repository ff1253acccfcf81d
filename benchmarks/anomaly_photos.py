"""Anomaly cases on real images, every one scored through ``vaepipe embed`` (pipeline.run.run_embed).

    .venv/bin/python benchmarks/anomaly_photos.py --photo-checkpoint /work/runs/mix32/model.safetensors
    .venv/bin/python benchmarks/anomaly_photos.py --quick --photo-checkpoint CKPT   # smoke run

Cases (normal vs anomalous; every ``--score``: AUROC, AUPRC, FPR at 95% TPR, scoring cost per image):

* ``elpv``: solar-cell electroluminescence images (PyPI ``elpv-dataset``, CC-BY-NC-SA-4.0: read
  from the installed package, never copied into the repo; cached shards live under ``.bench/``).
  The 1,508 cells with defect probability 0 are split seeded 70/10/20 into train/val/test-normal;
  a greyscale 64 px model (``VAEConfig.default_for(64, 1)``: plain trunk, discretized logistic) is
  trained on train for ``--budget`` seconds (validation = val). Test: test-normal against the
  defective cells, counted two ways: probability >= 2/3 (the annotators' "defective", 821 cells)
  and probability > 0 (1,116), plus per-probability rows. The 300 px cells are resized to 64 px.
* ``shift``: a photo model (``--photo-checkpoint``): photo test crops against ``nonphoto/``
  crops (markers, charts, text, microscopy), and against ``gray/`` (the same test crops rendered
  greyscale, stored as RGB).
* ``corrupt``: ``--corrupt-n`` seeded test crops decoded at the model's size by vaepipe's own
  decode, then corrupted at three severities (see :data:`CORRUPTIONS`), stored as PNG (JPEG for
  the JPEG corruption); normal = the same crops clean, stored the same way (PNG). Corrupting at
  the model's input size makes the corruption what the model sees (a blur or noise at 1000 px
  would be mostly averaged away by the resize).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402
from ood_metrics import auprc, auroc, fpr_at_tpr  # noqa: E402

from pipeline.convert import write_shards  # noqa: E402
from pipeline.options import EmbedOptions  # noqa: E402
from pipeline.run import run_embed  # noqa: E402

BENCH = ROOT / ".bench" / "anomaly-photos"
PHOTOS = ROOT / ".bench" / "photos"
SCORES = ("elbo", "iwae", "complexity", "typicality")
SEED = 0
BEAM = ["--direct_num_workers=1", "--direct_running_mode=in_memory"]
# name -> (severities, what a severity is); pixel values are 0..255 at the model's size S.
CORRUPTIONS = {
    "noise": ((8, 16, 32), "additive Gaussian noise, sigma in grey levels, clipped"),
    "blur": ((0.5, 1.0, 2.0), "Gaussian blur, radius in pixels at 32 px (scaled by S/32)"),
    "jpeg": ((20, 10, 5), "JPEG at this quality (Pillow, 4:2:0)"),
    "occlusion": ((0.25, 0.4, 0.6), "a grey (128) square of this fraction of the side, seeded position"),
    "contrast": ((0.6, 0.35, 0.15), "contrast scaled by this factor about the image's mean grey (ImageEnhance)"),
}


# --------------------------------------------------------------------------- data


def shards_of(files: list[Path], out: Path) -> Path:
    """Tar shards (1000 images each) of ``files`` under ``out``, built once (hard links, never copies)."""
    def build(d: Path) -> None:
        src = d.with_name(d.name + "-src")
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir(parents=True)
        for f in files:
            os.link(f, src / f.name)
        write_shards(str(src), str(d), fmt="tar", shard_size=1000)
        shutil.rmtree(src)

    out.parent.mkdir(parents=True, exist_ok=True)
    return common.build_once(out, build)


def elpv_cells() -> pd.DataFrame:
    """The cells' files, defect probabilities and types, read as ``elpv_dataset.utils.load_dataset`` does."""
    import elpv_dataset

    labels = Path(elpv_dataset.__file__).parent / "data" / "labels.csv"
    data = np.genfromtxt(labels, dtype=["|S19", "<f8", "|S4"], names=["path", "probability", "type"])
    return pd.DataFrame({"file": [labels.parent / p for p in np.char.decode(data["path"])],
                         "probability": data["probability"], "type": np.char.decode(data["type"])})


def elpv_sets(quick: bool) -> tuple[dict[str, Path], pd.DataFrame]:
    cells = elpv_cells()
    normal = cells.index[cells.probability == 0].to_numpy()
    normal = normal[np.random.default_rng(SEED).permutation(len(normal))]
    a, b = int(0.7 * len(normal)), int(0.8 * len(normal))
    split = {"train": normal[:a], "val": normal[a:b], "normal": normal[b:],
             "defect": cells.index[cells.probability > 0].to_numpy()}
    if quick:
        split = {k: v[:120] for k, v in split.items()}
    tag = "quick" if quick else "full"
    sets = {k: shards_of([cells.file[i] for i in v], BENCH / f"elpv-{tag}" / ("test" if k in ("normal", "defect") else "")
                         / k) for k, v in split.items()}
    cells["stem"] = [Path(f).stem for f in cells.file]
    return sets, cells


def corrupt(x: np.ndarray, name: str, sev: float, rng: np.random.Generator) -> tuple[bytes, str]:
    """(encoded bytes, extension) of one corrupted (S, S, 3) uint8 image."""
    s = x.shape[0]
    img = Image.fromarray(x)
    if name == "noise":
        img = Image.fromarray(np.clip(x + rng.normal(0, sev, x.shape), 0, 255).round().astype(np.uint8))
    elif name == "blur":
        img = img.filter(ImageFilter.GaussianBlur(sev * s / 32))
    elif name == "jpeg":
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(sev))
        return buf.getvalue(), "jpg"
    elif name == "occlusion":
        k = max(1, round(sev * s))
        i, j = rng.integers(0, s - k + 1, 2)
        y = x.copy()
        y[i:i + k, j:j + k] = 128
        img = Image.fromarray(y)
    elif name == "contrast":
        from PIL import ImageEnhance

        img = ImageEnhance.Contrast(img).enhance(sev)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue(), "png"


def corrupt_sets(ckpt: str, n: int) -> Path:
    """``clean/`` and ``{corruption}-{1,2,3}/`` shards of ``n`` seeded test crops at the model's size."""
    from pipeline.decode import decode_image
    from pipeline.options import trained_resize
    from vae_model.checkpoint_header import inspect_checkpoint

    info = inspect_checkpoint(ckpt)
    size, resize = info.config.image_size, trained_resize(info.meta)
    files = sorted((PHOTOS / "test").glob("*.jpg"))
    pick = sorted(np.random.default_rng(SEED).choice(len(files), size=min(n, len(files)), replace=False))

    def build(d: Path) -> None:
        rng = np.random.default_rng(SEED)
        folders = {"clean": []} | {f"{c}-{i + 1}": [] for c in CORRUPTIONS for i in range(3)}
        for k in pick:
            x = decode_image(files[k].read_bytes(), 3, size, resize=resize).transpose(1, 2, 0)  # (S, S, 3)
            buf = io.BytesIO()
            Image.fromarray(x).save(buf, "PNG")
            folders["clean"].append((files[k].stem, buf.getvalue(), "png"))
            for c, (sevs, _) in CORRUPTIONS.items():
                for i, sev in enumerate(sevs):
                    folders[f"{c}-{i + 1}"].append((files[k].stem, *corrupt(x, c, sev, rng)))
        for name, items in folders.items():
            src = d / f"{name}-src"
            src.mkdir()
            for stem, data, ext in items:
                (src / f"{stem}.{ext}").write_bytes(data)
            write_shards(str(src), str(d / name), fmt="tar", shard_size=1000)
            shutil.rmtree(src)

    return common.build_once(BENCH / f"corrupt-{size}px-{resize}-n{n}", build)


# --------------------------------------------------------------------------- scoring


def score_rows(data: Path, ckpt: str, name: str, score: str, iwae_k: int) -> tuple[pd.DataFrame, dict[str, float]]:
    """Rows of ``vaepipe embed --score score`` over every shard under ``data``, with a ``set`` column
    (the shard's folder relative to ``data``), and scoring seconds per set (the manifest's)."""
    out = BENCH / "out" / f"{name}-{score}"
    shutil.rmtree(out, ignore_errors=True)
    m = run_embed(str(data), EmbedOptions(ckpt, str(out), score=score, iwae_k=iwae_k, batch_size=256,
                                          skip_existing=False, torch_threads=1, report=False), BEAM)
    assert m["reconciled"], m
    df = pd.concat([pd.read_parquet(p) for p in sorted(out.glob("*.parquet"))], ignore_index=True)
    root = str(data.resolve())

    def set_of(shard: str) -> str:
        return shard.split(root, 1)[-1].strip("/").rsplit("/", 1)[0]

    df["set"] = df["shard"].map(set_of)
    secs: dict[str, float] = {}
    for s in m["shards"]:
        secs[set_of(s["shard"])] = secs.get(set_of(s["shard"]), 0.0) + s["seconds"]
    shutil.rmtree(out, ignore_errors=True)
    return df, secs


def metrics(normal: np.ndarray, anomalous: np.ndarray) -> dict:
    return {"auroc": round(auroc(normal, anomalous), 4), "auprc": round(auprc(normal, anomalous), 4),
            "fpr_at_95_tpr": round(fpr_at_tpr(normal, anomalous, 0.95), 4), "n_normal": len(normal),
            "n_anomalous": len(anomalous)}


def run_case(data: Path, ckpt: str, name: str, normal: str, iwae_k: int,
             groups: dict[str, Callable[[pd.DataFrame], pd.Series]] | None = None) -> dict:
    """Every score over ``data``; normal = rows of set ``normal``; each other set (or each of
    ``groups``: name -> row filter) is one anomalous case."""
    res: dict = {}
    for s in SCORES:
        t = time.perf_counter()
        df, secs = score_rows(data, ckpt, name, s, iwae_k)
        wall = time.perf_counter() - t
        common.log(f"{name} {s}: {len(df)} rows in {wall:.0f}s")
        base = df.loc[df.set == normal, "anomaly_score"].to_numpy()
        cases = groups or {k: (lambda d, k=k: d.set == k) for k in sorted(df.set.unique()) if k != normal}
        res[s] = {"cases": {k: metrics(base, df.loc[f(df), "anomaly_score"].to_numpy()) for k, f in cases.items()},
                  "scoring_seconds": round(sum(secs.values()), 2), "embed_wall_seconds": round(wall, 1),
                  "images": len(df), "ms_per_image": round(1000 * sum(secs.values()) / len(df), 3)}
    for s in SCORES:
        res[s]["cost_vs_elbo"] = round(res[s]["scoring_seconds"] / res["elbo"]["scoring_seconds"], 2)
    return res


def train_elpv(sets: dict[str, Path], budget: float, quick: bool) -> tuple[str, dict]:
    from jobs.train import TrainConfig, train

    out = BENCH / f"elpv64-{'quick' if quick else 'full'}.safetensors"
    cfg = TrainConfig(data_url=str(sets["train"]), val_url=str(sets["val"]), out=str(out), epochs=10000,
                      time_limit=budget, patience=10000, batch_size=64, lr_schedule="cosine", quantile_iwae_k=16,
                      model=dict(image_size=64, channels=1))
    t = time.perf_counter()
    if not common.trained(out):
        import torch

        torch.set_num_threads(1)
        train(cfg, progress=False)
    return str(out), {"budget_seconds": budget, "seconds_this_run": round(time.perf_counter() - t, 1),
                      "threads": 1, "train_images": "70% of the probability-0 cells", "model": cfg.model,
                      "batch_size": cfg.batch_size, "lr_schedule": cfg.lr_schedule}


def checkpoint_facts(ckpt: str) -> dict:
    from vae_model.checkpoint_header import inspect_checkpoint

    info = inspect_checkpoint(ckpt)
    tc = info.meta.get("train_config") or {}
    return {"config": info.config.to_dict(), "model_id": info.model_id,
            "meta": {k: info.meta.get(k) for k in ("epochs", "steps", "val_bits_per_dim", "data_url", "created_at")},
            "train_config": {k: tc.get(k) for k in ("time_limit", "epochs", "batch_size", "lr", "lr_schedule")}}


# --------------------------------------------------------------------------- report


def print_case(title: str, res: dict) -> None:
    print(f"\n{title}")
    rows = []
    for s, r in res.items():
        for k, m in r["cases"].items():
            rows.append([s, k, m["auroc"], m["auprc"], m["fpr_at_95_tpr"], m["n_normal"], m["n_anomalous"],
                         r["ms_per_image"], r["cost_vs_elbo"]])
    print(common.table(rows, ["score", "anomalous", "AUROC", "AUPRC", "FPR@95TPR", "normal", "anom", "ms/img",
                              "cost/elbo"]))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="elpv,shift,corrupt")
    ap.add_argument("--photo-checkpoint", default="/work/runs/mix32/model.safetensors")
    ap.add_argument("--elpv-checkpoint", default=None, help="skip training: score with this elpv model")
    ap.add_argument("--budget", type=float, default=600.0, help="elpv training seconds (1 thread)")
    ap.add_argument("--iwae-k", type=int, default=16)
    ap.add_argument("--corrupt-n", type=int, default=500, help="test crops per corruption set")
    ap.add_argument("--shift-n", type=int, default=None, help="at most this many images per shift set")
    ap.add_argument("--quick", action="store_true", help="smoke run: 120 cells per split, 120 s training, 60 crops")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.budget, args.corrupt_n, args.shift_n, args.iwae_k = 120.0, 60, 100, 4
    cases = args.cases.split(",")
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"anomaly-photos{'-quick' if args.quick else ''}.json")
    prev = json.loads(out.read_text()) if out.exists() else {}
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "iwae_k": args.iwae_k,
              "scores": list(SCORES), "beam": BEAM, "torch_threads": 1, "argv": sys.argv,
              "when": time.strftime("%Y-%m-%d %H:%M:%S"), "cases": dict(prev.get("cases", {}))}
    if "elpv" in cases:
        sets, cells = elpv_sets(args.quick)
        if args.elpv_checkpoint:
            ck, budget = args.elpv_checkpoint, {"given": True}
        else:
            ck, budget = train_elpv(sets, args.budget, args.quick)
        test = sets["normal"].parent
        prob = dict(zip(cells.stem, cells.probability))

        def p_of(d: pd.DataFrame) -> pd.Series:
            return d.key.str.rsplit("/", n=1).str[-1].map(prob)

        groups = {"defect p>=2/3": lambda d: (d.set == "defect") & (p_of(d) >= 0.6),
                  "defect p>0": lambda d: d.set == "defect",
                  **{f"defect p={p:.2f}": (lambda d, p=p: (d.set == "defect") & (p_of(d).sub(p).abs() < 0.01))
                     for p in (1 / 3, 2 / 3, 1.0)}}
        res = run_case(test, ck, "elpv", "normal", args.iwae_k, groups)
        result["cases"]["elpv"] = {"checkpoint": ck, "training": budget, "facts": checkpoint_facts(ck),
                                   "normal": "held-out probability-0 cells", "results": res}
        print_case("elpv: held-out normal cells vs defective cells (64 px greyscale)", res)
        save(out, result, "elpv")
    if "shift" in cases or "corrupt" in cases:
        facts = checkpoint_facts(args.photo_checkpoint)
    if "shift" in cases:
        lim = args.shift_n
        data = BENCH / f"shift-n{lim or 'all'}"
        for name in ("test", "nonphoto", "gray"):  # a seeded subset (names sort by source photo)
            files = sorted((PHOTOS / name).glob("*.jpg"))
            pick = np.random.default_rng(SEED).permutation(len(files))[:lim]
            shards_of([files[i] for i in sorted(pick)], data / name)
        res = run_case(data, args.photo_checkpoint, "shift", "test", args.iwae_k)
        result["cases"]["shift"] = {"checkpoint": args.photo_checkpoint, "facts": facts,
                                    "normal": "photo test crops", "results": res}
        print_case(f"shift: photo test crops vs nonphoto/ and gray/ ({facts['config']['image_size']} px)", res)
        save(out, result, "shift")
    if "corrupt" in cases:
        data = corrupt_sets(args.photo_checkpoint, args.corrupt_n)
        res = run_case(data, args.photo_checkpoint, "corrupt", "clean", args.iwae_k)
        result["cases"]["corrupt"] = {"checkpoint": args.photo_checkpoint, "facts": facts, "n": args.corrupt_n,
                                      "corruptions": {k: {"severities": v[0], "what": v[1]}
                                                      for k, v in CORRUPTIONS.items()},
                                      "normal": "the same crops clean, PNG at the model's size", "results": res}
        print_case(f"corrupt: clean vs corrupted test crops at {facts['config']['image_size']} px", res)
        save(out, result, "corrupt")


def save(out: Path, result: dict, case: str) -> None:
    """Write the results after each case (a run cut short keeps the cases it finished); each case
    records its own command and time (a later run of other cases keeps them)."""
    result["cases"][case] |= {"argv": sys.argv, "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    common.write_json(out, result)


if __name__ == "__main__":
    main()
