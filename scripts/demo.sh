#!/usr/bin/env bash
# The main job end to end on the embedded default: real images on local disk, DirectRunner.
#   1. shards from the Fashion-MNIST slice in data/demo/ (2,000 images) and an MNIST slice (200)
#   2. train a small VAE on Fashion-MNIST briefly
#   3. vaepipe embed on the DirectRunner (both cores) over Fashion-MNIST + MNIST shards
#   4. print the output location, the row count and the top anomalies (DuckDB over the Parquet)
#   5. write the run report (one HTML file beside the partition) and print its path
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DEMO_OUT:-demo_out}
EPOCHS=${DEMO_EPOCHS:-8}
RUN_DATE=$(date +%F)
rm -rf "$OUT"
mkdir -p "$OUT"
export PYTHONWARNINGS=ignore

echo "== 1/4 shards"
vaepipe shards data/demo/fashion-mnist-2k-images-idx3-ubyte.gz "$OUT/train" --shard-size 500
vaepipe shards data/demo/fashion-mnist-2k-images-idx3-ubyte.gz "$OUT/score/fashion" --shard-size 500 --limit 1000
vaepipe shards data/demo/mnist-200-images-idx3-ubyte.gz "$OUT/score/mnist" --shard-size 100

echo "== 2/4 train ($EPOCHS epochs)"
# a quarter held out: the typicality reference and the score quantiles are fitted on it
vaepipe train "$OUT/train" --out "$OUT/model/vae.safetensors" --epochs "$EPOCHS" --latent-dim 16 \
  --val-fraction 0.25 --quiet
vaepipe generate "$OUT/model/vae.safetensors" --out "$OUT/model/samples.png" --n 64

echo "== 3/4 embed (DirectRunner, 2 worker processes, score = typicality: (ELBO, complexity) KDE + latent kNN density)"
vaepipe embed "$OUT/score/**/*.tar" --checkpoint "$OUT/model/vae.safetensors" --out "$OUT/latents" \
  --score typicality --run-date "$RUN_DATE" --no-report \
  --direct_num_workers=2 --direct_running_mode=multi_processing 2>&1 \
  | grep -vE "apache_beam|sdk harness|^WARNING:root" || true

echo "== 4/4 results"
python - "$OUT" <<'PY'
import sys, duckdb
out = sys.argv[1]
rows = f"{out}/latents/dt=*/*.parquet"
n = duckdb.sql(f"select count(*) from read_parquet('{rows}')").fetchall()[0][0]
print(f"output: {out}/latents   rows: {n}")
print("top 10 anomalies (a Fashion-MNIST model: MNIST digits are out of distribution, odd Fashion images may rank too):")
print(duckdb.sql(f"""
  select regexp_extract(shard, 'score/([a-z]+)/', 1) as source, key.split('/')[-1] as member, label,
         round(anomaly_score, 1) as score, round(anomaly_percentile, 2) as pct, is_anomaly
  from read_parquet('{rows}') order by anomaly_score desc limit 10"""))
print(duckdb.sql(f"""
  select regexp_extract(shard, 'score/([a-z]+)/', 1) as source, count(*) as images,
         sum(is_anomaly::int) as flagged, round(avg(elbo), 1) as mean_elbo_nats
  from read_parquet('{rows}') group by 1 order by 1"""))
auroc = duckdb.sql(f"""
  with s as (select shard like '%/score/mnist/%' as mnist, anomaly_score as v from read_parquet('{rows}'))
  select avg(case when a.v > b.v then 1.0 when a.v = b.v then 0.5 else 0.0 end)
  from s a join s b on a.mnist and not b.mnist""").fetchall()[0][0]
print(f"AUROC MNIST vs Fashion-MNIST (P[an MNIST digit scores above a Fashion image]): {auroc:.3f}")
PY

echo "== 5/5 report (embed writes it by default; the demo writes it last, so that its path ends the output)"
vaepipe report "$OUT/latents/dt=$RUN_DATE"
