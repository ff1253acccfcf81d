"""GPU figures in one short run on a lent CUDA machine (issue 4, section 5).

    python3 benchmarks/gpu.py --fashion-test T10K_IMAGES.gz --checkpoint CK [--mnist-test ... --mnist-checkpoint ...]

  a        the pipeline's scoring function ``score_batch`` over in-memory batches (per-image
           noise and float64 likelihood included), fp32 and bf16, several batch sizes
  a-fwd    the bare forward pass (ELBO with device-side noise): the model's own ceiling
  c        ``vaepipe embed`` (DirectRunner) on tar shards on local disk, --device cuda, bf16 and
           fp32, 1 and several worker processes
  rows     GPU rows against the CPU rows of the same images (``--cpu-rows``): embedding and ELBO
           differences, fp32 and bf16
  iwae     MNIST test NLL with IWAE-k on all test images (``jobs.evaluate``), when given
  agree    the on-device pixel hash and noise (issue 13): CUDA against CPU bit for bit (hash) and
           to 1e-6 (noise), and ``score_batch`` rows on CUDA fp32 against CPU fp32 (embedding
           max abs, ELBO max relative); targets 1e-5 and 1e-6
  ratios   (a) / (a-fwd) per precision and batch (issue 13 target: >= 0.5 at batch 1,024)

Issue 13's short check (one command, a few minutes of device time):

    python3 benchmarks/gpu.py --short --fashion-test t10k-images-idx3-ubyte.gz --checkpoint fmnist.safetensors

N images = the Fashion-MNIST test set written ``--copies`` times under different shard names
(content repeats; throughput does not depend on it). Everything is printed as a table at the end
and written to ``--out`` as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_shards(src: str, work: Path, copies: int, shard_size: int) -> tuple[Path, int]:
    from pipeline.shards import write_shards

    one = work / "one"
    write_shards(src, str(one), fmt="tar", shard_size=shard_size)
    data = work / "shards"
    data.mkdir(parents=True, exist_ok=True)
    tars = sorted(one.glob("*.tar"))
    for c in range(copies):
        for t in tars:
            shutil.copy(t, data / f"copy{c}-{t.name}")
    from pipeline.idx import read_idx
    n = len(read_idx(src)) * copies
    return data, n


def model_only(ck: str, images, batch_sizes: list[int], precisions: list[str], device: str) -> list[dict]:
    import torch

    from vae_model.checkpoint import load_checkpoint
    from vae_model.scoring import ScoreOptions, for_scoring, score_batch

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows = []
    x_host = images
    for prec in precisions:
        model = for_scoring(load_checkpoint(ck, map_location=dev).model, dev, prec)  # as the pipeline does
        opts = ScoreOptions(score="elbo", precision=prec)
        for bs in batch_sizes:
            score_batch(model, x_host[:bs], None, opts, dev)  # warm-up
            sync()
            t0 = time.perf_counter()
            for i in range(0, len(x_host), bs):
                score_batch(model, x_host[i:i + bs], None, opts, dev)
            sync()
            dt = time.perf_counter() - t0
            rows.append({"variant": "a", "precision": prec, "batch": bs, "images": len(x_host),
                         "img_s": len(x_host) / dt})
            log(f"a {prec} bs={bs}: {len(x_host) / dt:,.0f} img/s")
        # the bare forward pass, data already on the device
        xd = torch.from_numpy(x_host).to(dev)
        for bs in batch_sizes:
            eps = torch.randn(bs, model.cfg.latent_dim, device=dev)
            with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=prec == "bf16"):
                model.elbo(xd[:bs], eps=eps)
                sync()
                t0 = time.perf_counter()
                for i in range(0, len(xd) - bs + 1, bs):
                    model.elbo(xd[i:i + bs], eps=eps)
                sync()
            n = (len(xd) // bs) * bs
            dt = time.perf_counter() - t0
            rows.append({"variant": "a-fwd", "precision": prec, "batch": bs, "images": n, "img_s": n / dt})
            log(f"a-fwd {prec} bs={bs}: {n / dt:,.0f} img/s")
    return rows


def agreement(ck: str, images, device: str, n: int = 4096) -> dict:
    """CUDA against CPU on the same images: pixel hashes (bits), noise, and fp32 rows."""
    import numpy as np
    import torch

    from vae_model.checkpoint import load_checkpoint
    from vae_model.noise import hash_noise, pixel_hash
    from vae_model.scoring import ScoreOptions, for_scoring, score_all

    x = images[:n]
    h_cpu, h_dev = pixel_hash(x), pixel_hash(torch.from_numpy(x).to(device))
    z_cpu, z_dev = hash_noise(h_cpu, 32, 0, 0, 64), hash_noise(h_dev, 32, 0, 0, 64)
    cpu = score_all(for_scoring(load_checkpoint(ck).model, "cpu"), x, ScoreOptions("elbo"), "cpu", 256)
    dev = score_all(for_scoring(load_checkpoint(ck, map_location=device).model, device), x, ScoreOptions("elbo"),
                    device, 1024)
    res = {"images": len(x), "hash_equal": bool(torch.equal(h_cpu, h_dev.cpu())),
           "noise_max_abs": float((z_cpu - z_dev.cpu()).abs().max()),
           "embedding_max_abs": float(np.abs(cpu["embedding"] - dev["embedding"]).max()),
           "elbo_max_rel": float((np.abs(cpu["elbo"] - dev["elbo"]) / np.abs(cpu["elbo"])).max())}
    res["met"] = (res["hash_equal"] and res["noise_max_abs"] <= 1e-6 and res["embedding_max_abs"] <= 1e-5
                  and res["elbo_max_rel"] <= 1e-6)
    log(f"agree (CUDA vs CPU): {res}")
    return res


def ratios(rows: list[dict]) -> dict:
    """(a) / (a-fwd) for every precision and batch measured."""
    fwd = {(r["precision"], r["batch"]): r["img_s"] for r in rows if r["variant"] == "a-fwd"}
    return {f"{r['precision']}@{r['batch']}": round(r["img_s"] / fwd[(r["precision"], r["batch"])], 3)
            for r in rows if r["variant"] == "a" and (r["precision"], r["batch"]) in fwd}


def embed_run(data: Path, ck: str, out: Path, n: int, precision: str, workers: int, batch: int,
              device: str, score: str = "elbo") -> dict:
    cmd = [sys.executable, "-m", "jobs", "embed", str(data), "--checkpoint", ck, "--out", str(out),
           "--device", device, "--precision", precision, "--batch-size", str(batch), "--score", score,
           "--no-skip-existing", f"--direct_num_workers={workers}",
           "--direct_running_mode=" + ("multi_processing" if workers > 1 else "in_memory")]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=400)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"embed failed ({p.returncode}): {p.stderr[-2000:]}")
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    rows = summary["totals"]["rows"]
    assert rows == n, (rows, n)
    shards = json.loads((out / "_manifest.json").read_text())["shards"]
    per_pid: dict = {}
    for s in shards:
        per_pid[s.get("pid")] = per_pid.get(s.get("pid"), 0.0) + s["seconds"]
    res = {"variant": "c", "precision": precision, "workers": workers, "batch": batch, "score": score,
           "images": rows, "wall_s": dt, "img_s": rows / dt,
           "in_shards_img_s": rows / max(per_pid.values()),  # excludes start-up: the busiest worker's shard time
           "worker_pids": len(per_pid)}
    log(f"c {precision} workers={workers} bs={batch} {score}: {rows / dt:,.0f} img/s ({dt:.1f} s); "
        f"{res['in_shards_img_s']:,.0f} img/s inside shards, {len(per_pid)} worker processes")
    return res


def compare_rows(gpu_dir: Path, cpu_rows: str) -> dict:
    import numpy as np
    import pyarrow.dataset as ds

    def load(path):
        t = ds.dataset(str(path), format="parquet").to_table(columns=["key", "embedding", "elbo"]).to_pandas()
        t["k"] = t["key"].str.rsplit("/", n=1).str[-1]
        return t.set_index("k")

    g, c = load(gpu_dir), load(cpu_rows)
    g = g[g["key"].str.contains("/copy0-")]
    common = c.index.intersection(g.index)
    g, c = g.loc[common], c.loc[common]
    eg, ec = np.stack(g["embedding"].values), np.stack(c["embedding"].values)
    return {"images": int(len(common)), "embedding_max_abs": float(np.abs(eg - ec).max()),
            "elbo_max_rel": float((np.abs(g["elbo"].values - c["elbo"].values) / np.abs(c["elbo"].values)).max())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fashion-test", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--copies", type=int, default=5)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--cpu-rows", default=None, help="CPU embed output of the same test images (fp32)")
    ap.add_argument("--mnist-test", default=None)
    ap.add_argument("--mnist-checkpoint", default=None)
    ap.add_argument("--iwae-k", type=int, default=1000)
    ap.add_argument("--work", default="/tmp/gpubench")
    ap.add_argument("--device", default="cuda", help="cpu only for a smoke test of this script")
    ap.add_argument("--embed", default="bf16:1,bf16:4,bf16:8,fp32:4", help="precision:workers runs of (c)")
    ap.add_argument("--embed-batch", type=int, default=1024)
    ap.add_argument("--a-batches", default="256,1024,4096")
    ap.add_argument("--skip-a", action="store_true")
    ap.add_argument("--limit", type=int, default=None, help="smoke test: fewer MNIST test images")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--short", action="store_true", help="issue 13's check: (a) vs (a-fwd) at batch 1,024, fp32 and "
                                                         "bf16, CUDA-vs-CPU agreement, one embed run (bf16, 4 workers)")
    args = ap.parse_args()
    if args.short:
        args.a_batches, args.copies, args.embed = "1024", 2, "bf16:4"

    import torch
    res: dict = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu", "torch": torch.__version__,
                 "cpus": os.cpu_count(),
                 "rows": [], "errors": []}
    out = Path(args.out)

    def save():
        (out / "gpu.json").write_text(json.dumps(res, indent=2))

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    data, n = make_shards(args.fashion_test, work, args.copies, args.shard_size)
    log(f"{n} images in {len(list(data.glob('*.tar')))} shards")
    res["images"] = n

    try:
        if args.skip_a:
            raise SystemExit
        from jobs.data import ShardImageDataset, list_specs, load_tensor
        x = load_tensor(ShardImageDataset(list_specs(str(data)), 1, 28, split="all")).numpy()
        res["rows"] += model_only(args.checkpoint, x, [int(b) for b in args.a_batches.split(",")],
                                  ["fp32", "bf16"], args.device)
        res["a_over_forward"] = ratios(res["rows"])
        log(f"(a) / (a-fwd): {res['a_over_forward']} (target >= 0.5 at batch 1,024)")
        if args.device != "cpu":
            res["agree"] = agreement(args.checkpoint, x, args.device)
    except SystemExit:
        pass
    except Exception:
        res["errors"].append(traceback.format_exc())
        log(traceback.format_exc())
    save()

    for spec in filter(None, args.embed.split(",")):
        prec, workers, batch = spec.split(":")[0], int(spec.split(":")[1]), args.embed_batch
        try:
            o = work / f"out-{prec}-{workers}"
            res["rows"].append(embed_run(data, args.checkpoint, o, n, prec, workers, batch, args.device))
            if args.cpu_rows and f"rows_vs_cpu_{prec}" not in res:
                cmp = compare_rows(o, args.cpu_rows)
                res[f"rows_vs_cpu_{prec}"] = cmp
                log(f"rows vs CPU ({prec}): {cmp}")
        except Exception:
            res["errors"].append(traceback.format_exc())
            log(traceback.format_exc())
        save()

    if args.mnist_test and args.mnist_checkpoint:
        try:
            from jobs.evaluate import EvalOptions, evaluate
            from pipeline.shards import write_shards
            mt = work / "mnist-test"
            write_shards(args.mnist_test, str(mt), fmt="tar", shard_size=5000)
            t0 = time.perf_counter()
            ev = evaluate(str(mt), args.mnist_checkpoint, EvalOptions(iwae_k=args.iwae_k, batch_size=100, seed=0,
                                                                               limit=args.limit))
            ev["wall_s"] = time.perf_counter() - t0
            res["mnist_iwae"] = ev
            log(f"MNIST IWAE-{args.iwae_k}: {ev}")
        except Exception:
            res["errors"].append(traceback.format_exc())
            log(traceback.format_exc())
        save()

    print("\nvariant  precision  batch  workers        img/s")
    for r in res["rows"]:
        print(f"{r['variant']:8} {r['precision']:9} {r['batch']:6} {r.get('workers', '-'):>7} {r['img_s']:12,.0f}")
    for k in ("a_over_forward", "agree", "rows_vs_cpu_fp32", "rows_vs_cpu_bf16", "mnist_iwae"):
        if k in res:
            print(k, json.dumps(res[k]))
    print("errors:", len(res["errors"]))
    save()


if __name__ == "__main__":
    main()
