"""What the latents are worth for search: label precision@10 and mAP@100 on Fashion-MNIST.

Queries: the 10k test images; database: the 60k training images (Debian ``dataset-fashion-mnist``,
``/usr/share/datasets/fashion-mnist``). Neighbours by Euclidean distance (and cosine where
stated), exact search. Compared at each latent size D:

  vaepipe mu       the posterior means ``vaepipe embed`` writes (the ``embedding`` column),
                   from a model trained here with ``jobs.train`` under a time budget
  raw pixels       the 784 pixel values
  PCA-D            the pixels projected on the top D principal axes of the training images

and, to explain a gap, variants of the same posterior means: cosine, each dimension divided
by its spread over the database (diagonal whitening), divided by its mean posterior std
(``exp(logvar / 2)``), full whitening, and only the active units (Var(mu_d) > 0.01, the usual
posterior-collapse count, Burda et al. 2016).

precision@10: the share of a query's 10 nearest database images with the query's label.
AP@100: (1/100) * sum over ranks i <= 100 of precision@i at each relevant rank (every class has
6000 >= 100 database images, so 100 = min(100, relevant)); mAP@100 averages it over queries.

    .venv/bin/python benchmarks/retrieval.py            # full sets; two models, 4 min each on the first 8k train images
    .venv/bin/python benchmarks/retrieval.py --quick    # data/demo's 2k slice (1600 database, 400 queries)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DEMO = common.REPO / "data" / "demo" / "fashion-mnist-2k-images-idx3-ubyte.gz"
ACTIVE_VARIANCE = 0.01


def load_sets(quick: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(database images, labels, query images, labels): uint8 (N, 1, 28, 28), int64 (N,)."""
    from pipeline.idx import labels_url_for, read_idx

    def pair(url: Path) -> tuple[np.ndarray, np.ndarray]:
        return read_idx(str(url))[:, None], read_idx(labels_url_for(str(url))).astype(np.int64)

    if quick:
        x, y = pair(DEMO)
        return x[:1600], y[:1600], x[1600:], y[1600:]
    if not (common.FMNIST / "train-images-idx3-ubyte.gz").exists():
        raise SystemExit(f"{common.FMNIST} missing: apt-get install dataset-fashion-mnist")
    return (*pair(common.FMNIST / "train-images-idx3-ubyte.gz"), *pair(common.FMNIST / "t10k-images-idx3-ubyte.gz"))


# --------------------------------------------------------------------------- metrics


def neighbours(q: np.ndarray, db: np.ndarray, k: int, metric: str = "l2", chunk: int = 1000) -> np.ndarray:
    """Indices (Q, k) of each query's k nearest database vectors, nearest first (exact search)."""
    q, db = q.astype(np.float32), db.astype(np.float32)
    if metric == "cosine":
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        db = db / np.maximum(np.linalg.norm(db, axis=1, keepdims=True), 1e-12)
    sq = (db * db).sum(1)
    out = np.empty((len(q), k), np.int64)
    for i in range(0, len(q), chunk):
        d = sq[None] - 2.0 * q[i:i + chunk] @ db.T  # |q|^2 is the same for every candidate of a query
        part = np.argpartition(d, k, axis=1)[:, :k]
        order = np.argsort(np.take_along_axis(d, part, 1), axis=1, kind="stable")
        out[i:i + chunk] = np.take_along_axis(part, order, 1)
    return out


def scores(q: np.ndarray, yq: np.ndarray, db: np.ndarray, ydb: np.ndarray, metric: str = "l2") -> dict:
    """precision@10 and mAP@100 of the queries against the database."""
    return rank_scores(ydb[neighbours(q, db, 100, metric)] == yq[:, None])


def rank_scores(rel: np.ndarray) -> dict:
    """precision@10 and mAP@100 from each query's relevance of its 100 nearest (Q, 100), nearest first."""
    rel = np.asarray(rel, dtype=np.float64)
    prec_at = np.cumsum(rel, 1) / np.arange(1, 101)
    ap = (prec_at * rel).sum(1) / 100.0
    return {"p@10": round(float(rel[:, :10].mean()), 4), "mAP@100": round(float(ap.mean()), 4)}


def pca(train: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, top-d axes (784, d), their variances) of the training vectors."""
    x = train.reshape(len(train), -1).astype(np.float64)
    mean = x.mean(0)
    vals, vecs = np.linalg.eigh(np.cov(x - mean, rowvar=False))
    top = np.argsort(vals)[::-1][:d]
    return mean, vecs[:, top], vals[top]


# --------------------------------------------------------------------------- models and embeddings


from vae_model.errors import VaePipeError  # noqa: E402


def train_model(shards: Path, out: Path, latent_dim: int, seconds: float, quick: bool) -> dict:
    from dataclasses import replace

    from jobs.train import TrainConfig, train

    t0 = time.perf_counter()
    # quick: 2 epochs whatever the time (a smoke run on a busy machine must still finish one)
    cfg = TrainConfig(data_url=str(shards), out=str(out), epochs=2 if quick else 1000,
                      time_limit=None if quick else seconds, lr_schedule="cosine", quantile_images=500,
                      quantile_iwae_k=4, model={"latent_dim": latent_dim})
    # On a machine so busy that the time limit comes before the end of the first epoch, the run
    # stops resumable without a checkpoint: resume it to the end of that epoch.
    if Path(str(out) + ".resume.pt").exists() and not out.exists():
        res = train(replace(cfg, resume=True, epochs=1, time_limit=None), progress=False)
    else:
        try:
            res = train(cfg, progress=False)
        except VaePipeError as exc:
            if "first epoch" not in str(exc):
                raise
            common.log(f"latent {latent_dim}: time limit inside the first epoch (busy machine); resuming to its end")
            res = train(replace(cfg, resume=True, epochs=1, time_limit=None), progress=False)
    info = {"latent_dim": latent_dim, "epochs": res.epochs, "steps": res.steps, "stopped": res.stopped,
            "val_bits_per_dim": round(res.best_val_bits_per_dim, 4), "train_s": round(time.perf_counter() - t0, 1),
            "checkpoint": str(out), "model_id": res.model_id}
    common.log(f"trained latent {latent_dim}: {json.dumps(info)}")
    return info


def encode(checkpoint: Path, x: np.ndarray, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(posterior mean, posterior log-variance) of uint8 images, as scoring computes them."""
    import torch

    from vae_model.checkpoint import load_checkpoint
    from vae_model.scoring import for_scoring

    model = for_scoring(load_checkpoint(str(checkpoint)).model)
    mus, logvars = [], []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            xb = torch.from_numpy(x[i:i + batch_size]).contiguous(memory_format=torch.channels_last)
            q = model.encode(model.prepare(xb)[0])
            mus.append(q.mean.float().numpy())
            logvars.append(q.logvar.float().numpy())
    return np.concatenate(mus), np.concatenate(logvars)


def embedded_by_cli(checkpoint: Path, shards: Path, out: Path) -> np.ndarray:
    """The ``embedding`` column ``vaepipe embed`` writes for the shards, in image order."""
    import pyarrow.parquet as pq

    subprocess.run([str(common.VENV_BIN / "vaepipe"), "embed", str(shards), "--checkpoint", str(checkpoint),
                    "--out", str(out), "--mode", "overwrite"], check=True, capture_output=True)
    t = pq.read_table(str(out), columns=["shard", "index", "embedding"]).to_pandas()
    t = t.sort_values(["shard", "index"])
    return np.stack(t["embedding"].to_numpy())


def evaluate_latents(mu_db, lv_db, mu_q, lv_q, ydb, yq) -> tuple[dict, dict]:
    """The posterior means and their rescalings: {variant: scores}, plus diagnostics."""
    var = mu_db.var(0)
    active = var > ACTIVE_VARIANCE
    spread = np.sqrt(var) + 1e-8
    post_std = np.exp(0.5 * lv_db).mean(0)
    cov = np.cov(mu_db - mu_db.mean(0), rowvar=False)
    vals, vecs = np.linalg.eigh(cov)
    white = vecs / np.sqrt(np.maximum(vals, 1e-8))  # (D, D): mu -> whitened
    m = mu_db.mean(0)
    rows = {
        "vaepipe mu (L2)": scores(mu_q, yq, mu_db, ydb),
        "vaepipe mu (cosine)": scores(mu_q, yq, mu_db, ydb, "cosine"),
        "mu / spread (diagonal whitening)": scores(mu_q / spread, yq, mu_db / spread, ydb),
        "mu / mean posterior std": scores(mu_q / post_std, yq, mu_db / post_std, ydb),
        "mu, full whitening": scores((mu_q - m) @ white, yq, (mu_db - m) @ white, ydb),
        "mu, active units only": scores(mu_q[:, active], yq, mu_db[:, active], ydb),
    }
    rows.update(index_scores(mu_q, yq, mu_db, ydb))
    diag = {"active_units": int(active.sum()), "latent_dim": int(len(var)),
            "var_mu_per_dim": [round(float(v), 4) for v in np.sort(var)[::-1]],
            "mean_posterior_std_per_dim": [round(float(v), 4) for v in post_std[np.argsort(var)[::-1]]]}
    return rows, diag


def index_scores(mu_q, yq, mu_db, ydb) -> dict:
    """The same queries through vaepipe's index (pipeline.index.VectorIndex, flat: exact), as
    ``vaepipe index`` builds it: cosine (its default), and ``--whiten`` with either metric."""
    from pipeline.index import VectorIndex

    out = {}
    for name, metric, whiten in (("vaepipe index, cosine", "cosine", False),
                                 ("vaepipe index --whiten, cosine", "cosine", True),
                                 ("vaepipe index --whiten, l2", "l2", True)):
        idx = VectorIndex.new(mu_db.shape[1], metric, "flat", whiten=whiten)
        idx.train(mu_db)
        idx.add([str(i) for i in range(len(mu_db))], mu_db, labels=[int(y) for y in ydb])
        hits = idx.search(mu_q, 100)
        out[name] = rank_scores(np.array([[h.label for h in row] for row in hits]) == yq[:, None])
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="data/demo's 2k slice, 2-epoch models (a smoke run)")
    ap.add_argument("--latent-dims", default="16,32")
    ap.add_argument("--train-seconds", type=float, default=240.0, help="training budget per model")
    ap.add_argument("--train-images", type=int, default=8000,
                    help="train on the first N training images (the database is all of them)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    seconds = args.train_seconds
    out = Path(args.out or common.RESULTS / ("retrieval-quick.json" if args.quick else "retrieval.json"))
    t_all = time.perf_counter()
    xdb, ydb, xq, yq = load_sets(args.quick)
    common.log(f"database {len(xdb)}, queries {len(xq)}")
    from pipeline.shards import write_shards

    tag = "quick" if args.quick else "full"
    work = common.BENCH / "retrieval" / tag
    train_src = DEMO if args.quick else common.FMNIST / "train-images-idx3-ubyte.gz"
    test_src = DEMO if args.quick else common.FMNIST / "t10k-images-idx3-ubyte.gz"
    n_train = min(len(xdb), args.train_images)  # the model trains on the first n_train database images
    db_shards = common.build_once(work / f"train{n_train}", lambda d: write_shards(
        str(train_src), str(d), shard_size=5000, limit=n_train))
    # the queries as shards too, for the check that vaepipe embed writes the means measured here
    q_shards = common.build_once(work / "queries1000", lambda d: write_shards(
        str(test_src), str(d), shard_size=5000, limit=2000 if args.quick else 1000))
    result: dict = {"quick": args.quick, "database": len(xdb), "queries": len(xq), "train_seconds": seconds,
                    "train_images": n_train, "argv": sys.argv, "load_average_at_start": common.load_average(),
                    "busy_other_processes_at_start": common.busy_others(), "baselines": {}, "models": {}}
    t0 = time.perf_counter()
    result["baselines"]["raw pixels (784, L2)"] = scores(xq.reshape(len(xq), -1), yq, xdb.reshape(len(xdb), -1), ydb)
    common.log(f"raw pixels: {result['baselines']['raw pixels (784, L2)']} ({time.perf_counter() - t0:.1f}s)")
    for d in [int(s) for s in args.latent_dims.split(",")]:
        mean, axes, pvar = pca(xdb, d)
        pq_, pdb = (xq.reshape(len(xq), -1) - mean) @ axes, (xdb.reshape(len(xdb), -1) - mean) @ axes
        entry: dict = {"PCA (L2)": scores(pq_, yq, pdb, ydb), "PCA (cosine)": scores(pq_, yq, pdb, ydb, "cosine"),
                       "PCA whitened": scores(pq_ / np.sqrt(pvar), yq, pdb / np.sqrt(pvar), ydb)}
        ck = work / f"vae-d{d}.safetensors"
        info = train_model(db_shards, ck, d, seconds, args.quick)
        mu_db, lv_db = encode(ck, xdb)
        mu_q, lv_q = encode(ck, xq)
        rows, diag = evaluate_latents(mu_db, lv_db, mu_q, lv_q, ydb, yq)
        entry.update(rows)
        # what vaepipe embed writes for the queries: the same means (the queries' order is the IDX order)
        cli = embedded_by_cli(ck, q_shards, work / f"embed-d{d}")
        cli, lib = (cli[1600:], mu_q) if args.quick else (cli, mu_q[:1000])  # the first 1000 queries
        diag["cli_vs_library_max_abs_diff"] = float(np.abs(cli - lib).max())
        result["models"][str(d)] = {"train": info, "scores": entry, "diagnostics": diag}
        common.log(f"latent {d}: " + json.dumps(entry) + f" active units {diag['active_units']}/{d}, "
                   f"cli-library max diff {diag['cli_vs_library_max_abs_diff']:.2e}")
    result["seconds"] = round(time.perf_counter() - t_all, 1)
    header = ["representation", "dim", "p@10", "mAP@100"]
    body = [["raw pixels (L2)", 784, *result["baselines"]["raw pixels (784, L2)"].values()]]
    for d, m in result["models"].items():
        body += [[name, d, s["p@10"], s["mAP@100"]] for name, s in m["scores"].items()]
    print(common.table(body, header))
    for d, m in result["models"].items():
        g = m["diagnostics"]
        print(f"latent {d}: active units {g['active_units']}/{g['latent_dim']}; Var(mu_d) sorted: "
              f"{g['var_mu_per_dim']}; trained {m['train']['epochs']} epochs in {m['train']['train_s']}s")
    common.write_json(out, result)


if __name__ == "__main__":
    main()
