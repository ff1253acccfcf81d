"""vaepipe embed side by side with a peer a user would pick: Ray Data (issue 13, sections 3 and 4).

Same machine, same run, same checkpoint, same N images in the same tar shards, same cores:

  vaepipe  ``vaepipe embed DATA --checkpoint CK --out OUT`` (DirectRunner, its default: one worker
           process per core), timed as a child process; its manifest gives the timeline (driver
           start-up, first shard, in-shard time of the busiest worker, teardown): the fixed cost
  ray      Ray Data in its own virtual environment (never a vaepipe dependency):
           ``read_binary_files`` over the tar shards -> ``flat_map`` to one row per member ->
           ``map_batches`` with a callable class holding the model (one actor per core, 1 torch
           thread each; it decodes with Pillow and calls the same ``score_batch``) -> ``write_parquet``

Both write the same scores (embedding, elbo, recon_nll, kl, bits_per_dim, anomaly_score) per
image. Runs alternate; medians and the paired ratio per repeat are reported.

    python3 -m venv /work/peer-venv
    /work/peer-venv/bin/pip install torch==2.13.0 "ray[data]" "pyarrow<26" pillow safetensors fsspec
    .venv/bin/python benchmarks/peer.py --images 10000 --repeats 3 --peer-python /work/peer-venv/bin/python
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

TARGET = 1.3  # vaepipe img/s over the peer's


# --------------------------------------------------------------------------- the peer (runs in the peer's venv)


def child_ray(args) -> dict:
    import io
    import tarfile

    import numpy as np
    import ray

    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo))
    t_start = time.perf_counter()
    ray.init(num_cpus=args.cpus + 1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    t_init = time.perf_counter()

    def members(row: dict) -> list[dict]:
        out, pending = [], {}
        with tarfile.open(fileobj=io.BytesIO(row["bytes"]), mode="r:") as tf:
            for info in tf:
                stem, _, ext = info.name.partition(".")
                pending.setdefault(stem, {})[ext] = tf.extractfile(info).read()
        for stem, parts in pending.items():
            png = next((v for k, v in parts.items() if k in ("png", "jpg", "jpeg", "webp")), None)
            if png is not None:
                out.append({"key": f"{row['path']}/{stem}", "label": int(parts.get("cls", b"-1")), "png": png})
        return out

    ck, cpus = args.checkpoint, args.cpus

    class Scorer:
        """The model, loaded once per actor; one batch of members -> rows."""

        def __init__(self) -> None:
            import torch

            from vae_model.checkpoint import load_checkpoint
            from vae_model.scoring import ScoreOptions, for_scoring

            torch.set_num_threads(1)
            self.model = for_scoring(load_checkpoint(ck).model)
            self.opts = ScoreOptions(score="elbo")

        def __call__(self, batch: dict) -> dict:
            from PIL import Image

            from vae_model.scoring import score_batch

            x = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("L"))[None] for b in batch["png"]])
            s = score_batch(self.model, x, None, self.opts)
            return {"key": batch["key"], "label": batch["label"], "embedding": list(s["embedding"]),
                    **{k: s[k] for k in ("elbo", "recon_nll", "kl", "bits_per_dim", "anomaly_score")}}

    ds = (ray.data.read_binary_files(args.data, include_paths=True, file_extensions=["tar"])
          .flat_map(members)
          .map_batches(Scorer, batch_size=args.batch_size, concurrency=cpus, num_cpus=1, batch_format="numpy"))
    ds.write_parquet(args.out)
    t_end = time.perf_counter()
    import pyarrow.parquet as pq

    n = sum(pq.ParquetFile(f).metadata.num_rows for f in Path(args.out).glob("*.parquet"))
    ray.shutdown()
    return {"images": n, "init_s": t_init - t_start, "pipeline_s": t_end - t_init,
            "ray": ray.__version__}


# --------------------------------------------------------------------------- parent


def _iso(s: str) -> float:
    return dt.datetime.fromisoformat(s).timestamp()


def vaepipe_run(common, data: str, ck: str, out: Path, bs: int) -> dict:
    cmd = [str(common.VENV_BIN / "vaepipe"), "embed", data, "--checkpoint", ck, "--out", str(out),
           "--batch-size", str(bs), "--no-skip-existing", "--no-report"]
    t0 = time.time()
    r = common.run_child(cmd, timeout=900)
    t1 = time.time()
    man = json.loads((out / "_manifest.json").read_text()) if r["rc"] == 0 else {}
    shards = man.get("shards", [])
    per_pid: dict = {}
    for s in shards:
        per_pid[s.get("pid")] = per_pid.get(s.get("pid"), 0.0) + s["seconds"]
    starts = [_iso(s["started_at"]) for s in shards if s.get("started_at")]
    ends = [_iso(s["started_at"]) + s["seconds"] for s in shards if s.get("started_at")]
    n = man.get("totals", {}).get("rows", 0)
    res = {"variant": "vaepipe", "rc": r["rc"], "images": n, "wall_s": r["wall_s"], "cpu_s": r["cpu_s"],
           "img_s": n / r["wall_s"] if n else None, "workers": len(per_pid)}
    if starts:
        res.update({
            "in_shard_s": max(per_pid.values()),  # the busiest worker's time inside its shards
            "in_shard_img_s": n / max(per_pid.values()),
            "to_driver_start_s": _iso(man["started_at"]) - t0,  # interpreter, imports, checks, lease
            "to_first_shard_s": min(starts) - t0,  # + Beam start-up, workers' imports and model load
            "after_last_shard_s": t1 - max(ends),  # manifest, drift, teardown, exit
            "shard_span_s": max(ends) - min(starts)})
    return res


def ray_run(common, peer_python: str, data: str, ck: str, out: Path, bs: int, cpus: int) -> dict:
    cmd = [peer_python, str(Path(__file__).resolve()), "child-ray", "--data", data, "--checkpoint", ck,
           "--out", str(out), "--batch-size", str(bs), "--cpus", str(cpus)]
    r = common.run_child(cmd, timeout=900)
    res = {"variant": "ray", "rc": r["rc"], "wall_s": r["wall_s"], "cpu_s": r["cpu_s"]}
    if r["rc"] == 0:
        child = common.last_json(r["stdout"])
        res.update(child, img_s=child["images"] / r["wall_s"], pipeline_img_s=child["images"] / child["pipeline_s"])
    else:
        res["error"] = r["stderr_tail"][-1500:]
    return res


def main() -> None:
    import common

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--cpus", type=int, default=2, help="the peer's actors (vaepipe: one worker per core)")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--peer-python", default="/work/peer-venv/bin/python")
    ap.add_argument("--variants", default="vaepipe,ray")
    ap.add_argument("--out", default=str(common.RESULTS / "peer.json"))
    args = ap.parse_args()
    ck = args.checkpoint or str(common.ensure_checkpoint())
    data = str(common.image_set(args.images))
    work = common.BENCH / "peer-out"
    rows: list[dict] = []
    variants = args.variants.split(",")
    others = common.busy_others()
    for rep in range(args.repeats):
        for v in variants if rep % 2 == 0 else variants[::-1]:
            out = work / f"{v}-{rep}"
            shutil.rmtree(out, ignore_errors=True)
            r = (vaepipe_run(common, data, ck, out, args.batch_size) if v == "vaepipe" else
                 ray_run(common, args.peer_python, data, ck, out, args.batch_size, args.cpus))
            r["rep"] = rep
            rows.append(r)
            common.log(json.dumps({k: (round(x, 3) if isinstance(x, float) else x) for k, x in r.items()
                                   if k != "error"}))
            if r.get("error"):
                common.log(r["error"])
            shutil.rmtree(out, ignore_errors=True)

    def med(v: str, key: str):
        return common.median([r.get(key) for r in rows if r["variant"] == v and r["rc"] == 0])

    summary = {v: {k: med(v, k) for k in ("img_s", "wall_s", "cpu_s", "in_shard_img_s", "to_driver_start_s",
                                          "to_first_shard_s", "after_last_shard_s", "init_s", "pipeline_img_s")}
               for v in variants}
    paired = []
    for rep in range(args.repeats):
        a = [r["img_s"] for r in rows if r["variant"] == "vaepipe" and r["rep"] == rep and r["rc"] == 0]
        b = [r["img_s"] for r in rows if r["variant"] == "ray" and r["rep"] == rep and r["rc"] == 0]
        if a and b:
            paired.append(round(a[0] / b[0], 3))
    summary["vaepipe/ray"] = {"per_repeat": paired, "median": common.median(paired), "target": TARGET}
    result = {"images": args.images, "checkpoint": ck, "batch_size": args.batch_size, "cpus": args.cpus,
              "busy_other_processes_at_start": others, "load_avg_end": common.load_average(), "summary": summary,
              "runs": rows}
    print(json.dumps(summary, indent=1))
    common.write_json(Path(args.out), result)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child-ray":
        ap = argparse.ArgumentParser()
        for flag in ("--data", "--checkpoint", "--out"):
            ap.add_argument(flag, required=True)
        ap.add_argument("--batch-size", type=int, default=256)
        ap.add_argument("--cpus", type=int, default=2)
        print(json.dumps(child_ray(ap.parse_args(sys.argv[2:]))), flush=True)
    else:
        main()
