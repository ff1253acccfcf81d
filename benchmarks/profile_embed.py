"""Where one worker's time goes in ``ShardEmbedder.process`` (the unit of work of ``vaepipe embed``).

Single process, 1 torch thread (what each of the 2 multi_processing DirectRunner workers gets):

1. cProfile of ``ShardEmbedder.process`` (``--score elbo`` or ``none``) over the ``--images``
   images (5000-image tar shards; the decode thread is invisible to cProfile, so stage 2 times it);
2. per-image CPU and wall cost of each stage on the first shard, timed alone: tar read,
   ``decode_image``, ``np.stack``, (elbo: pixel-hash ids + ``noise_for_keys``), ``score_batch``,
   ``_record_batch`` (+ Parquet write); then the whole of ``process`` over every shard and the
   CPU the stages do not account for;
3. the fixed start-up costs of a run, each in a fresh interpreter: Python, ``import apache_beam``,
   ``import torch``, ``import pipeline.embed`` and a worker's setup (``ShardEmbedder``).

``--against REV`` instead measures the model-only path (a) of issue 13: ``score_batch`` of this
tree against ``score_batch`` of git revision REV (its ``vae_model/scoring.py`` and
``vae_model/noise.py``, loaded beside this tree's), interleaved on the same in-memory batches,
and the part of each that lies outside the model's forward pass (``model.elbo`` on the same
NHWC batch with ready noise, float64 likelihood as scoring has it), plus a torch.profiler table.

    taskset -c 1 .venv/bin/python benchmarks/profile_embed.py --score none --images 10000 [--repeats 3] [--quick]
    .venv/bin/python benchmarks/profile_embed.py --against a05d89b [--images 10000] [--threads 1]
"""
from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def _old_scoring(rev: str):
    """``vae_model.scoring`` as it was at git revision ``rev``, with that revision's noise module."""
    import importlib.util
    import subprocess

    def load(name: str, path: str, replace: tuple[str, str] | None = None):
        src = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=common.REPO, capture_output=True, text=True,
                             check=True).stdout
        if replace:
            src = src.replace(*replace)
        spec = importlib.util.spec_from_loader(f"vae_model.{name}", loader=None)
        mod = importlib.util.module_from_spec(spec)
        mod.__package__ = "vae_model"
        sys.modules[spec.name] = mod
        exec(compile(src, f"{rev}:{path}", "exec"), mod.__dict__)
        return mod

    load("_old_noise", "vae_model/noise.py")
    return load("_old_scoring", "vae_model/scoring.py", ("from .noise import", "from ._old_noise import"))


def against(args) -> None:
    """(a) of issue 13: this tree's score_batch against revision ``args.against``'s, same batches."""
    import numpy as np
    import torch

    from jobs.data import ShardImageDataset, list_specs, load_tensor
    from vae_model.checkpoint import load_checkpoint
    from vae_model.noise import hash_noise, pixel_hash
    from vae_model.scoring import ScoreOptions, for_scoring, score_batch

    torch.set_num_threads(args.threads)
    ck = args.checkpoint or str(common.ensure_checkpoint(quick=args.quick))
    data = common.image_set(args.images)
    x = load_tensor(ShardImageDataset(list_specs(str(data)), 1, 28, split="all")).numpy()[:args.limit or args.images]
    model = for_scoring(load_checkpoint(ck).model)
    old = _old_scoring(args.against)
    opts, old_opts = ScoreOptions(score="elbo"), old.ScoreOptions(score="elbo")
    bs = args.batch_size
    batches = [x[i:i + bs] for i in range(0, len(x), bs)]
    eps = [hash_noise(pixel_hash(b), model.cfg.latent_dim)[0] for b in batches]
    xs_cl = [torch.from_numpy(b).contiguous(memory_format=torch.channels_last) for b in batches]

    def new_a():
        for b in batches:
            score_batch(model, b, None, opts)

    def old_a():
        for b in batches:
            old.score_batch(model, b, None, old_opts)

    def forward():  # the model's own work in score_batch: the same call, input and noise ready
        with torch.no_grad():
            for xb, e in zip(xs_cl, eps):
                model.elbo(xb, eps=e, precise=True)

    def forward_fp32():  # the bare loop's forward pass (float32 likelihood)
        with torch.no_grad():
            for xb, e in zip(xs_cl, eps):
                model.elbo(xb, eps=e)

    def old_noise():
        for b in batches:
            old.noise_for_keys(old.pixel_ids(b), (model.cfg.latent_dim,), 0)

    def new_noise():
        for b in batches:
            hash_noise(pixel_hash(b), model.cfg.latent_dim)

    fns = {"a new": new_a, "a old": old_a, "forward (float64 likelihood)": forward,
           "forward (float32 likelihood)": forward_fp32, "hash + noise old": old_noise, "hash + noise new": new_noise}
    new_a(), old_a(), forward()  # warm-up (oneDNN primitive cache)
    times: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}  # CPU seconds: steadier than wall time on a shared box
    for r in range(args.repeats):
        for name, fn in (fns.items() if r % 2 == 0 else reversed(fns.items())):  # alternate order against drift
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    n = len(x)
    med = {k: common.median(v) for k, v in times.items()}
    res = {"against": args.against, "images": n, "batch_size": bs, "torch_threads": args.threads, "checkpoint": ck,
           "load_avg": common.load_average(), "busy_others": common.busy_others(),
           "img_s": {k: round(n / v, 1) for k, v in med.items()},
           "us_per_image": {k: round(1e6 * v / n, 1) for k, v in med.items()},
           "cpu_us_per_image": {k: round(1e6 * common.median(v) / n, 1) for k, v in cpu.items()},
           "per_repeat_s": {k: [round(t, 3) for t in v] for k, v in times.items()}}
    mc = {k: common.median(v) for k, v in cpu.items()}
    res["cpu_a_new_over_old"] = round(mc["a old"] / mc["a new"], 3)
    res["cpu_fraction_outside_forward"] = {"old": round(1 - mc["forward (float64 likelihood)"] / mc["a old"], 3),
                                           "new": round(1 - mc["forward (float64 likelihood)"] / mc["a new"], 3)}
    fwd = med["forward (float64 likelihood)"]
    res["a_new_over_old"] = round(med["a old"] / med["a new"], 3)
    res["fraction_outside_forward"] = {"old": round(1 - fwd / med["a old"], 3), "new": round(1 - fwd / med["a new"], 3)}
    res["a_new_over_forward_fp32"] = round(med["forward (float32 likelihood)"] / med["a new"], 3)
    a, b = score_batch(model, batches[0], None, opts), old.score_batch(model, batches[0], None, old_opts)
    res["embedding_max_abs_diff_vs_old"] = float(np.abs(a["embedding"] - b["embedding"]).max())
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for bb in batches[:8]:
            score_batch(model, bb, None, opts)
    res["profiler_new"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15).splitlines()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for bb in batches[:8]:
            old.score_batch(model, bb, None, old_opts)
    res["profiler_old"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15).splitlines()
    print(common.table([[k, res["img_s"][k], res["us_per_image"][k], res["cpu_us_per_image"][k]] for k in fns],
                       ["path", "img/s", "us/img", "CPU us/img"]))
    print(json.dumps({k: res[k] for k in ("a_new_over_old", "fraction_outside_forward", "a_new_over_forward_fp32",
                                          "cpu_a_new_over_old", "cpu_fraction_outside_forward",
                                          "embedding_max_abs_diff_vs_old", "load_avg")}))
    common.write_json(Path(args.out), res)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--against", metavar="REV", help="(a) of this tree against git revision REV's score_batch")
    ap.add_argument("--images", type=int, default=10000, help="images (a cached image set: 5000-image shards)")
    ap.add_argument("--score", default="elbo", choices=("elbo", "none"), help="the score the stages profile")
    ap.add_argument("--limit", type=int, default=None, help="--against: only the first LIMIT of those images")
    ap.add_argument("--threads", type=int, default=1, help="--against: torch threads")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.against:
        args.out = args.out or str(common.RESULTS / "score_path.json")
        return against(args)
    args.out = args.out or str(common.RESULTS / ("profile_embed.json" if args.score == "elbo"
                                                  else f"profile_embed-{args.score}.json"))
    stages(args)


_STARTUP = {  # one fresh interpreter each: what every `vaepipe embed` pays before its first image
    "python -c pass": "pass",
    "import apache_beam (driver and each worker)": "import apache_beam",
    "import torch": "import torch",
    "import pipeline.embed (torch, pyarrow, Pillow, ...)": "import pipeline.embed",
    "import pipeline.embed + ShardEmbedder(...) (a worker's setup)":
        "import sys; from pipeline.embed import EmbedOptions, ShardEmbedder; "
        "ShardEmbedder(EmbedOptions(checkpoint=sys.argv[1], out_url=sys.argv[2], score=sys.argv[3], torch_threads=1))",
}


def startup_costs(ck: str, score: str, repeats: int) -> dict[str, dict[str, float]]:
    """CPU and wall seconds of each start-up step in a fresh interpreter (medians of ``repeats``)."""
    import resource
    import subprocess

    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, code in _STARTUP.items():
            wall, cpu = [], []
            for _ in range(repeats):
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-c", code, ck, tmp, score], cwd=common.REPO, check=True)
                wall.append(time.perf_counter() - t0)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
            out[name] = {"wall_s": round(common.median(wall), 3), "cpu_s": round(common.median(cpu), 3)}
    return out


def stages(args) -> None:
    """Where one worker's time goes in ``ShardEmbedder.process`` for ``--score``: cProfile of the
    main thread, each stage timed alone (CPU and wall per image), the whole of ``process`` and
    what the stages do not account for, and the fixed start-up costs."""
    import numpy as np
    import torch

    from pipeline.decode import decode_image
    from pipeline.embed import BatchItem, EmbedOptions, ShardEmbedder
    from pipeline.shards import expand_shards, iter_members
    from pipeline.writer import AtomicParquetWriter
    from vae_model.noise import noise_for_keys, pixel_ids  # pixel_ids: hex of the on-device hash

    torch.set_num_threads(1)
    ck = args.checkpoint or str(common.ensure_checkpoint(quick=args.quick))
    data = common.image_set(2000 if args.quick else args.images)
    specs = expand_shards(str(data))
    spec = specs[0]
    res: dict = {"score": args.score, "shards": len(specs), "checkpoint": ck, "torch_threads": 1,
                 "load_avg_start": common.load_average(), "busy_others": common.busy_others()}

    # 1. cProfile of the real thing (main thread; the decode thread is timed in stage 2)
    with tempfile.TemporaryDirectory() as tmp:
        emb = ShardEmbedder(EmbedOptions(checkpoint=ck, out_url=tmp, skip_existing=False, torch_threads=1,
                                         score=args.score))
        emb.process(spec)  # warm-up: imports, oneDNN primitives
        prof = cProfile.Profile()
        t0, c0 = time.perf_counter(), time.process_time()
        prof.enable()
        n = sum(emb.process(sp)["images_seen"] for sp in specs)
        prof.disable()
        res["process_img_s"] = n / (time.perf_counter() - t0)
        res["process_cpu_us_per_image_profiled"] = round(1e6 * (time.process_time() - c0) / n, 1)
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(15)
    res["cprofile_top_tottime"] = s.getvalue().splitlines()[:40]
    print(f"ShardEmbedder.process --score {args.score}, 1 thread, under cProfile: {res['process_img_s']:.0f} img/s "
          f"on {n} images in {len(specs)} shards")
    print("\n".join(res["cprofile_top_tottime"][4:24]))

    # 2. stages timed alone on the first shard, and the whole of process() on every shard
    members = list(iter_members(spec))
    m1 = len(members)
    pix = np.stack([decode_image(m.data, emb.cfg.channels, emb.cfg.image_size) for m in members])
    bs = args.batch_size
    items = [BatchItem(f"{spec.name}/{m.key}", m.index, m.label, m.meta, p) for m, p in zip(members, pix)]
    batches = [items[i:i + bs] for i in range(0, m1, bs)]
    scored = [emb._score(pix[i:i + bs]) for i in range(0, m1, bs)]

    def t_read():
        for _ in iter_members(spec):
            pass

    def t_decode():
        for m in members:
            decode_image(m.data, emb.cfg.channels, emb.cfg.image_size)

    def t_noise():
        for i in range(0, m1, bs):
            noise_for_keys(pixel_ids(pix[i:i + bs]), (emb.cfg.latent_dim,), 0)

    def t_stack():
        for b in batches:
            np.stack([x.pixels for x in b])

    def t_score():
        for i in range(0, m1, bs):
            emb._score(pix[i:i + bs])

    def t_rows():
        for b, sc in zip(batches, scored):
            emb._record_batch(spec, b, sc)

    def t_write():
        with tempfile.TemporaryDirectory() as tmp:
            w = AtomicParquetWriter(f"{tmp}/x.parquet", emb.schema)
            for b, sc in zip(batches, scored):
                w.write(emb._record_batch(spec, b, sc))
            w.commit(emb.file_meta)

    with tempfile.TemporaryDirectory() as tmp:
        emb.opts = dataclasses.replace(emb.opts, out_url=tmp)  # the first one is gone
        stage_fns = {"tar read (iter_members)": t_read, "decode_image": t_decode,
                     "np.stack of a batch": t_stack, f"score_batch --score {args.score}": t_score,
                     "_record_batch": t_rows, "_record_batch + Parquet write": t_write}
        if args.score != "none":
            stage_fns = {**dict(list(stage_fns.items())[:3]), "pixel_ids + noise_for_keys (diagnostic)": t_noise,
                         **dict(list(stage_fns.items())[3:])}
        wall: dict[str, list[float]] = {k: [] for k in [*stage_fns, "process (all shards)"]}
        cpu: dict[str, list[float]] = {k: [] for k in wall}
        for _ in range(args.repeats):
            for name, fn in stage_fns.items():
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                wall[name].append((time.perf_counter() - t0) / m1)
                cpu[name].append((time.process_time() - c0) / m1)
            t0, c0 = time.perf_counter(), time.process_time()
            for sp in specs:
                emb.process(sp)
            wall["process (all shards)"].append((time.perf_counter() - t0) / n)
            cpu["process (all shards)"].append((time.process_time() - c0) / n)
    res["stage_us_per_image"] = {k: round(1e6 * common.median(v), 1) for k, v in wall.items()}
    res["stage_cpu_us_per_image"] = {k: round(1e6 * common.median(v), 1) for k, v in cpu.items()}
    parts = ("tar read (iter_members)", "decode_image", "np.stack of a batch", f"score_batch --score {args.score}",
             "_record_batch + Parquet write")
    c = res["stage_cpu_us_per_image"]
    res["cpu_us_per_image_outside_stages"] = round(c["process (all shards)"] - sum(c[k] for k in parts), 1)
    res["startup"] = startup_costs(ck, args.score, max(1, args.repeats))
    res["load_avg_end"] = common.load_average()
    print(f"\nper-image cost of each stage alone (1 thread, median of {args.repeats}; {m1} images):")
    print(common.table([[k, res["stage_us_per_image"][k], c[k]] for k in wall], ["stage", "wall us/img", "CPU us/img"]))
    print(f"process CPU not in the stages above (thread hand-off, ...): {res['cpu_us_per_image_outside_stages']} us/img")
    print("\nstart-up, fresh interpreter (median):")
    print(common.table([[k, v["wall_s"], v["cpu_s"]] for k, v in res["startup"].items()], ["step", "wall s", "CPU s"]))
    print("load average", res["load_avg_start"], "->", res["load_avg_end"])
    common.write_json(Path(args.out), res)

if __name__ == "__main__":
    main()
