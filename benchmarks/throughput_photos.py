"""Embedding throughput and memory on photos: 64 px RGB from ~1000 px JPEG sources (issue 12, section 4).

Same machine, same run, same 64 px photo checkpoint, same N images in the same tar shards, every
variant one process with one torch thread (the other core is left to whoever shares the machine):

  a  model only: ``score_batch`` over in-memory uint8 (B, 3, 64, 64) batches (the ceiling). The
     first shard is decoded untimed (vaepipe's decode) and cycled to N images.
  b  a bare loop as a user would write it: fsspec open + tarfile stream + Pillow
     (``Image.open(...).convert("RGB")`` + ``ImageOps.fit(..., BICUBIC)``) + ``score_batch`` +
     pyarrow ParquetWriter (one file per shard).
  c  ``vaepipe embed`` on the DirectRunner, one in-memory worker (``--direct_num_workers=1
     --direct_running_mode=in_memory --torch-threads 1``): the process doing the work is the
     ``vaepipe`` process itself, so its kernel peak RSS is the worker RSS.

  c-none  (``--variants ...,c-none``) c with ``--score none``: the encoder only, the embedding-only fast path.

c runs again at larger N (``--rss-sizes``) to show its RSS is flat: its RSS is sampled every 2 s,
and the median per tenth of the run shows whether it grows (a leak) or only swings (a bounded heap).
images/s is N / wall time of the whole command (interpreter start to exit); variants are interleaved (order reversed every other
repeat) and medians reported, with paired ratios (k-th run of c against the k-th run of b).

Data: ``photoset.py sources --side 1000 --n 200`` (JPEG q90, short side ~1000 px), written five
times under distinct names into one 1000-image tar shard, hard-linked N/1000 times under distinct
shard names (so keys are unique; the bytes repeat, and are read from the page cache).

    .venv/bin/python benchmarks/throughput.py --photos --checkpoint runs/photo64/model.safetensors
    .venv/bin/python benchmarks/throughput_photos.py --quick --checkpoint CKPT   # smoke run (< 2 min)
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TARGETS = {"c/b": 1.0, "worker_rss_mb": 1536}
SOURCES = common.BENCH / "src1000"
SETS = common.BENCH / "photo-sets"
SHARD = 1000
TRACE_EVERY = 2.0  # seconds between RSS samples of the c runs
BEAM = ["--direct_num_workers=1", "--direct_running_mode=in_memory", "--torch-threads", "1"]


# --------------------------------------------------------------------------- data


def ensure_sources() -> Path:
    if not SOURCES.exists():
        subprocess.run([sys.executable, str(Path(__file__).with_name("photoset.py")), "sources", "--side", "1000",
                        "--n", "200", "--out", str(SOURCES)], check=True)
    return SOURCES


def photo_set(n: int, shard: int = SHARD) -> Path:
    """A folder of ``n // shard`` tar shards of ~1000 px JPEGs (hard links to one ``shard``-image shard)."""
    if n % shard:
        raise SystemExit(f"--images/--rss-sizes must be multiples of --shard-size {shard}")
    src = sorted(ensure_sources().glob("*.jpg"))

    def base(d: Path) -> None:
        with tarfile.open(d / "base.tar", "w") as tf:
            for i in range(shard):
                tf.add(src[i % len(src)], arcname=f"r{i // len(src)}-{src[i % len(src)].name}")

    one = common.build_once(SETS / ("base" if shard == SHARD else f"base{shard}"), base) / "base.tar"

    def link(d: Path) -> None:
        for i in range(n // shard):
            os.link(one, d / f"shard-{i:06d}.tar")

    return common.build_once(SETS / (f"n{n}" if shard == SHARD else f"n{n}-s{shard}"), link)


# --------------------------------------------------------------------------- children (one per measurement)


def tar_images(fileobj, name: str):
    """(key, bytes) of every member of a tar stream (the photo shards hold images only)."""
    with tarfile.open(fileobj=fileobj, mode="r|") as tf:
        for info in tf:
            tf.members = []
            if info.isfile():
                yield f"{name}/{info.name.rsplit('.', 1)[0]}", tf.extractfile(info).read()


def naive_decode(data: bytes, size: int):
    """What a user writes: full decode, RGB, bicubic fit to a centred square."""
    import numpy as np
    from PIL import Image, ImageOps

    img = Image.open(io.BytesIO(data)).convert("RGB")
    return np.asarray(ImageOps.fit(img, (size, size), Image.Resampling.BICUBIC)).transpose(2, 0, 1)


def _load(ck: str):
    import torch

    from vae_model.checkpoint import load_checkpoint
    from vae_model.scoring import ScoreOptions, for_scoring

    torch.set_num_threads(1)
    model = for_scoring(load_checkpoint(ck).model)  # as vaepipe embed does
    return model, ScoreOptions(score="elbo", precision="fp32")


def child_model(args) -> dict:
    """(a) score_batch over in-memory batches; also decode-only timings of both decoders."""
    import numpy as np
    from fsspec.core import url_to_fs

    from pipeline.decode import decode_image
    from vae_model.scoring import score_batch

    model, opts = _load(args.checkpoint)
    size = model.cfg.image_size
    fs, path = url_to_fs(args.data)
    first = sorted(fs.glob(path.rstrip("/") + "/*.tar"))[0]
    with fs.open(first, "rb") as fh:
        items = list(tar_images(fh, first))
    x = np.stack([decode_image(b, 3, size) for _, b in items])
    keys = [k for k, _ in items]
    dec = {}
    for name, fn in (("vaepipe", lambda b: decode_image(b, 3, size)), ("naive", lambda b: naive_decode(b, size))):
        t = time.perf_counter()
        for _, b in items[:100]:
            fn(b)
        dec[f"decode_ms_{name}"] = 1000 * (time.perf_counter() - t) / 100
    bs = args.batch_size
    score_batch(model, x[:bs], keys[:bs], opts)  # warm-up (oneDNN primitive cache)
    t0 = time.perf_counter()
    done = 0
    while done < args.images:
        i = done % len(x)
        m = min(bs, len(x) - i, args.images - done)
        score_batch(model, x[i:i + m], [f"{k}/{done}" for k in keys[i:i + m]], opts)
        done += m
    return {"images": done, "work_s": time.perf_counter() - t0, **dec}


def child_bare(args) -> dict:
    """(b) the bare loop, no Beam: read, decode, score, write one Parquet file per shard."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from fsspec.core import url_to_fs

    from vae_model.scoring import score_batch

    model, opts = _load(args.checkpoint)
    size, d = model.cfg.image_size, model.cfg.latent_dim
    schema = pa.schema([("key", pa.string()), ("shard", pa.string()), ("embedding", pa.list_(pa.float32(), d)),
                        ("elbo", pa.float64()), ("recon_nll", pa.float64()), ("kl", pa.float64()),
                        ("bits_per_dim", pa.float64()), ("anomaly_score", pa.float64())])
    fs, path = url_to_fs(args.data)
    ofs, opath = url_to_fs(args.out)
    ofs.makedirs(opath, exist_ok=True)
    t0 = time.perf_counter()
    n = 0
    for shard in sorted(fs.glob(path.rstrip("/") + "/*.tar")):
        with fs.open(shard, "rb") as fh, ofs.open(f"{opath}/{shard.rsplit('/', 1)[-1]}.parquet", "wb") as out, \
                pq.ParquetWriter(out, schema, compression="zstd") as w:
            batch: list = []
            for item in [*tar_images(fh, shard), None]:  # None: flush the last batch
                if item is not None:
                    batch.append((item[0], naive_decode(item[1], size)))
                if batch and (len(batch) == args.batch_size or item is None):
                    s = score_batch(model, np.stack([b[1] for b in batch]), [b[0] for b in batch], opts)
                    w.write_batch(pa.RecordBatch.from_pydict({
                        "key": [b[0] for b in batch], "shard": [shard] * len(batch),
                        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(s["embedding"].reshape(-1)), d),
                        **{c: s[c] for c in ("elbo", "recon_nll", "kl", "bits_per_dim", "anomaly_score")}},
                        schema=schema))
                    n += len(batch)
                    batch = []
    return {"images": n, "work_s": time.perf_counter() - t0}


# --------------------------------------------------------------------------- parent


def command(variant: str, n: int, data: str, out: str, ck: str, bs: int) -> list[str]:
    me = [sys.executable, str(Path(__file__).resolve())]
    common_args = ["--data", data, "--checkpoint", ck, "--batch-size", str(bs), "--images", str(n)]
    if variant == "a":
        return [*me, "child-model", *common_args]
    if variant == "b":
        return [*me, "child-bare", *common_args, "--out", out]
    if variant in ("c", "c-none"):
        return [str(common.VENV_BIN / "vaepipe"), "embed", data, "--checkpoint", ck, "--out", out,
                "--batch-size", str(bs), "--no-report", *BEAM, *(["--score", "none"] if variant == "c-none" else [])]
    raise ValueError(variant)


def measure(variant: str, n: int, data: str, ck: str, bs: int) -> dict:
    out = str(common.BENCH / "out" / f"photos-{variant}-{uuid.uuid4().hex[:8]}")
    r = common.run_child(command(variant, n, data, out, ck, bs), env={"OMP_NUM_THREADS": "1"}, timeout=7200,
                         trace_every=TRACE_EVERY if variant == "c" else None)
    trace = r.pop("rss_trace", None)
    info = common.last_json(r.pop("stdout"))
    images = info.get("images") or (info.get("totals") or {}).get("images_seen")
    work = info.get("work_s") or info.get("seconds")
    row = {"variant": variant, "n": n, "images": images, **r, "work_s": work,
           "img_s": n / r["wall_s"] if r["rc"] == 0 else None,
           "img_s_work": n / work if work and r["rc"] == 0 else None,
           "cpu_ms_per_img": 1000 * r["cpu_s"] / n, "load_avg": common.load_average(),
           **{k: v for k, v in info.items() if k.startswith("decode_ms")}}
    if trace:
        row |= rss_over_time(trace)
    if images is not None and images != n:
        row["error"] = f"expected {n} images, got {images}"
        common.log(row["error"])
    shutil.rmtree(out, ignore_errors=True)
    common.log(f"{variant:3s} n={n:6d} wall={r['wall_s']:7.1f}s img/s={row['img_s'] or 0:6.1f} "
               f"work img/s={row['img_s_work'] or 0:6.1f} cpu={row['cpu_ms_per_img']:.2f}ms/img "
               f"peak RSS={r['maxrss_mb']}MB rc={r['rc']}")
    return row


def rss_over_time(trace: list) -> dict:
    """The process's RSS over the run (``common.TreeRSS`` samples every TRACE_EVERY s): median and max MB in
    each tenth of the samples taken once the model is loaded (RSS above half its run median),
    and the steady-state growth: the last tenth's median over the second tenth's (the first holds
    the start-up ramp). A leak shows as a ratio above 1; a bounded heap as ~1 with a noisy max."""
    rss = [t[1] for t in trace]
    if len(rss) < 20:
        return {}
    half = sorted(rss)[len(rss) // 2] / 2
    work = [v for v in rss if v > half]
    k = len(work)
    tenths = [work[i * k // 10:(i + 1) * k // 10] for i in range(10)]
    med = [common.median(t) for t in tenths]
    step = max(1, len(trace) // 400)
    return {"rss_tenths_median_mb": med, "rss_tenths_max_mb": [max(t) for t in tenths],
            "rss_steady_growth": round(med[-1] / med[1], 3), "rss_trace_every_s": TRACE_EVERY * step,
            "rss_trace_mb": [t[1] for t in trace[::step]]}


def summarize(rows: list[dict], n: int) -> dict:
    ok = [r for r in rows if r["rc"] == 0]

    def med(v: str, key: str, size: int = n):
        return common.median([r.get(key) for r in ok if r["variant"] == v and r["n"] == size])

    pv = {v: {k: med(v, k) for k in ("img_s", "img_s_work", "cpu_ms_per_img", "maxrss_mb", "tree_peak_mb", "wall_s")}
          | {"repeats": sum(1 for r in ok if r["variant"] == v and r["n"] == n)}
          for v in ["a", "b", "c", *sorted({r["variant"] for r in ok} - {"a", "b", "c"})]}
    pv["a"] |= {k: med("a", k) for k in ("decode_ms_vaepipe", "decode_ms_naive")}

    def ratio(x: str, y: str, key: str):
        p, q = pv[x][key], pv[y][key]
        return round(p / q, 3) if p and q else None

    none = (("c-none", "c"),) if "c-none" in pv else ()
    ratios = {f"{x}/{y} ({k})": ratio(x, y, k) for x, y in (("c", "b"), ("c", "a"), ("b", "a"), *none)
              for k in ("img_s", "img_s_work", "cpu_ms_per_img")}
    paired = {}
    for x, y in (("c", "b"), ("c", "a"), *none):
        rx = [r["img_s"] for r in ok if r["variant"] == x and r["n"] == n]
        ry = [r["img_s"] for r in ok if r["variant"] == y and r["n"] == n]
        per = [round(p / q, 3) for p, q in zip(rx, ry)]
        paired[f"{x}/{y}"] = {"per_repeat": per, "median": common.median(per)}
    sizes = sorted({r["n"] for r in ok})
    rss = {v: {s: med(v, "maxrss_mb", s) for s in sizes} for v in ("c", "b")}
    cs = [x for x in rss["c"].values() if x]
    cb = paired["c/b"]["median"] or ratios["c/b (img_s)"]
    largest = [r for r in ok if r["variant"] == "c" and r["n"] == max(sizes, default=n) and "rss_steady_growth" in r]
    growth = largest[-1]["rss_steady_growth"] if largest else None
    targets = {"c/b": {"target": TARGETS["c/b"], "value": cb, "met": cb is not None and cb >= TARGETS["c/b"]},
               "worker_rss": {"target_mb": TARGETS["worker_rss_mb"], "max_mb": max(cs, default=None),
                              "growth_smallest_to_largest_mb": round(max(cs) - min(cs), 1) if len(cs) > 1 else None,
                              "sizes": sizes,
                              # flat: the largest run's RSS in its last tenth within 10% of its second tenth's,
                              # and the peaks of every N within 10% of each other
                              "steady_growth_at_largest_n": growth,
                              "met": bool(cs) and max(cs) <= TARGETS["worker_rss_mb"] and max(cs) <= 1.1 * min(cs)
                              and growth is not None and growth <= 1.1}}
    over_time = [{"n": r["n"], "variant": r["variant"], "median": r["rss_tenths_median_mb"],
                  "max": r["rss_tenths_max_mb"], "growth": r["rss_steady_growth"]} for r in ok if "rss_steady_growth" in r]
    return {"per_variant": pv, "ratios": ratios, "paired_ratios": paired, "rss_by_size_mb": rss,
            "rss_over_time": over_time, "targets": targets}


def print_report(summary: dict, n: int) -> None:
    pv = summary["per_variant"]
    print(f"\nPhotos, 64 px from ~1000 px JPEGs, N={n}, 1 process x 1 torch thread each (medians)")
    print(common.table([[v, d["img_s"], d["img_s_work"], d["cpu_ms_per_img"], d["maxrss_mb"], d["repeats"]]
                        for v, d in pv.items()], ["variant", "img/s", "img/s work", "cpu ms/img", "peak RSS MB", "reps"]))
    print(f"decode only (ms/img, 1000 px JPEG -> 64 px): vaepipe {pv['a']['decode_ms_vaepipe']}, "
          f"naive Pillow {pv['a']['decode_ms_naive']}")
    print(common.table([[k, v] for k, v in summary["ratios"].items()], ["ratio", "value"]))
    print(common.table([[k, " ".join(map(str, v["per_repeat"])), v["median"]] for k, v in summary["paired_ratios"].items()],
                       ["paired", "per repeat", "median"]))
    sizes = summary["targets"]["worker_rss"]["sizes"]
    print("peak RSS by N (MB): " + json.dumps(summary["rss_by_size_mb"]))
    for r in summary.get("rss_over_time", []):
        print(f"  c at N={r['n']}: RSS median by tenth of the run {r['median']} MB, max {r['max']}, "
              f"last/second tenth {r['growth']}")
    print(common.table([[v, *[summary["rss_by_size_mb"][v].get(s) for s in sizes]] for v in ("c", "b")],
                       ["variant", *map(str, sizes)]))
    for k, t in summary["targets"].items():
        print(f"  {k:10s} {'MET ' if t['met'] else 'MISS'}  {json.dumps({a: b for a, b in t.items() if a != 'met'})}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="a 64 px RGB checkpoint (vaepipe train --channels 3 --image-size 64)")
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--rss-sizes", default="30000,60000", help="extra N for c (RSS flatness)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64,
                    help="64: a 64 px logistic-mixture batch of 256 peaks at ~3 GB in score_batch alone")
    ap.add_argument("--big-batch", type=int, default=256, help="one more c run at this batch size (its RSS); 0: none")
    ap.add_argument("--variants", default="a,b,c",
                    help="the interleaved variants: a, b, c and c-none (vaepipe embed --score none: issue 15's ratio)")
    ap.add_argument("--shard-size", type=int, default=SHARD,
                    help="images per tar shard (e.g. 10000: one big shard, the in-shard heap trim's case)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1000 images, 1 repeat, RSS at 2000")
    ap.add_argument("--out", default=None)
    ap.add_argument("--resummarize", metavar="JSON", help="recompute the summary of an earlier results file")
    args = ap.parse_args(argv)
    if args.resummarize:
        res = json.loads(Path(args.resummarize).read_text())
        res["summary"] = summarize(res["runs"], res["images"])
        print_report(res["summary"], res["images"])
        common.write_json(Path(args.resummarize), res)
        return
    if args.quick:
        args.images, args.rss_sizes, args.repeats = 1000, "2000", 1
    out = Path(args.out or common.RESULTS / f"throughput-photos{'-quick' if args.quick else ''}.json")
    n, sizes = args.images, [int(s) for s in args.rss_sizes.split(",") if s]
    data = {s: str(photo_set(s, args.shard_size)) for s in [n, *sizes]}
    started, t_all, others = time.strftime("%Y-%m-%dT%H:%M:%S"), time.perf_counter(), common.busy_others()
    if others:
        common.log("other busy processes on this machine: " + "; ".join(others))
    rows: list[dict] = []
    order = [v for v in args.variants.split(",") if v]
    plan = [(v, n, args.batch_size) for rep in range(args.repeats) for v in (order, order[::-1])[rep % 2]]
    plan += [("c", s, args.batch_size) for s in sizes] + ([("c", n, args.big_batch)] if args.big_batch else [])
    for v, size, bs in plan:
        row = measure(v, size, data[size], args.checkpoint, bs)
        rows.append(row | ({"variant": f"c-bs{bs}"} if bs != args.batch_size else {}))
        result = {"started": started, "seconds": round(time.perf_counter() - t_all, 1), "images": n,
                  "checkpoint": args.checkpoint, "batch_size": args.batch_size, "cpus": os.cpu_count(),
                  "source": f"photoset.py sources --side 1000 --n 200 (JPEG q90), repeated into {args.shard_size}-image "
                            "shards", "heap_slack_mb_env": os.environ.get("VAEPIPE_HEAP_SLACK_MB"),
                  "busy_other_processes_at_start": others, "argv": sys.argv, "quick": args.quick,
                  "complete": len(rows) == len(plan), "summary": summarize(rows, n), "runs": rows}
        common.write_json(out, result)  # after every run: a run cut short keeps what it measured
    print_report(result["summary"], n)


def child_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    for flag in ("--data", "--checkpoint", "--out"):
        ap.add_argument(flag)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--images", type=int, default=0)
    args = ap.parse_args(argv[1:])
    print(json.dumps({"child-model": child_model, "child-bare": child_bare}[argv[0]](args)), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("child-"):
        child_main(sys.argv[1:])
    else:
        main()
