"""Cost of the manifest's drift section: ``pipeline.drift.partition_drift`` over a synthetic
partition of N rows (the real row schema, zstd Parquet, D-dim float32 embeddings, F files),
with a previous partition of the same size to compare the scores with.

    python benchmarks/drift_cost.py [--quick] [--rows 1000000] [--dim 32] [--files 20]

Results: JSON to benchmarks/results/drift_cost[-quick].json and one line on stdout.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from pipeline.drift import partition_drift  # noqa: E402
from pipeline.schema import latent_schema  # noqa: E402

QUANTILES = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)


def _table(scores: np.ndarray) -> dict:
    t = {f"{q:g}": float(v) for q, v in zip(QUANTILES, np.quantile(scores, QUANTILES))}
    return {**t, "min": float(scores.min()), "max": float(scores.max()), "n": len(scores)}


def _write(folder: Path, rows: int, dim: int, files: int, table: dict, rng: np.random.Generator) -> list[str]:
    folder.mkdir(parents=True)
    schema = latent_schema(dim)
    qs = np.array([0.0, *QUANTILES, 1.0])
    vs = np.array([table["min"], *(table[f"{q:g}"] for q in QUANTILES), table["max"]])
    names = []
    for f in range(files):
        n = rows // files
        s = rng.normal(size=n)
        e = rng.normal(size=(n, dim)).astype(np.float32)
        cols = {fld.name: pa.nulls(n, fld.type) for fld in schema}
        cols["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(e.reshape(-1), pa.float32()), dim)
        cols["anomaly_score"] = pa.array(s)
        cols["anomaly_percentile"] = pa.array(100 * np.interp(s, vs, qs))
        cols["is_anomaly"] = pa.array(s > table["0.99"])
        names.append(f"part-{f:03d}.parquet")
        pq.write_table(pa.table(cols, schema=schema), folder / names[-1], compression="zstd")
    (folder / "_SUCCESS").write_bytes(b"")
    return names


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--files", type=int, default=20)
    a = ap.parse_args()
    rows = 20_000 if a.quick else a.rows
    rng = np.random.default_rng(0)
    cal = rng.normal(size=5000)
    emb = rng.normal(size=(5000, a.dim))
    ref = {"quantiles": _table(cal),
           "embedding_stats": {"n": 5000, "mean": emb.mean(0).tolist(), "cov": np.cov(emb, rowvar=False).tolist()}}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        prev = _write(out / "dt=2026-01-01", rows, a.dim, a.files, ref["quantiles"], rng)
        (out / "dt=2026-01-01" / "_manifest.json").write_text(json.dumps(
            {"model_id": "m", "calibration": "c", "options": {"score": "elbo"}, "files": prev}))
        files = _write(out / "dt=2026-01-02", rows, a.dim, a.files, ref["quantiles"], rng)
        context = {"out_url": str(out), "run_date": "2026-01-02", "model_id": "m", "calibration": "c",
                   "options": {"score": "elbo", "threshold_quantile": 0.99}, "drift_reference": ref}
        t = time.perf_counter()
        drift = partition_drift(str(out / "dt=2026-01-02"), files, context)
        secs = time.perf_counter() - t
    result = {"rows": rows, "previous_rows": rows, "latent_dim": a.dim, "files": a.files, "seconds": round(secs, 2),
              "rows_per_s": round(2 * rows / secs),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
              "verdict": drift["verdict"], "failed": drift["failed"]}
    path = HERE / "results" / f"drift_cost{'-quick' if a.quick else ''}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
