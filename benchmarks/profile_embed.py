"""Where one worker's time goes in ``ShardEmbedder.process`` (the unit of work of ``vaepipe embed``).

Single process, 1 torch thread (what each of the 2 multi_processing DirectRunner workers gets):

1. cProfile of ``ShardEmbedder.process`` on one 5000-image shard (the decode thread is invisible
   to cProfile, so stage 2 times it separately);
2. per-image cost of each stage on the same shard, timed alone: tar read, ``decode_image``,
   pixel-hash ids + ``noise_for_keys``, ``score_batch`` (model + float64 likelihood),
   ``_record_batch`` + Parquet write;
3. a candidate fix, side by side on the same images: ``score_batch`` with the model and input in
   channels_last memory format (fp32 both; numerics compared).

``--against REV`` instead measures the model-only path (a) of issue 13: ``score_batch`` of this
tree against ``score_batch`` of git revision REV (its ``vae_model/scoring.py`` and
``vae_model/noise.py``, loaded beside this tree's), interleaved on the same in-memory batches,
and the part of each that lies outside the model's forward pass (``model.elbo`` on the same
NHWC batch with ready noise, float64 likelihood as scoring has it), plus a torch.profiler table.

    .venv/bin/python benchmarks/profile_embed.py [--repeats 3] [--quick]
    .venv/bin/python benchmarks/profile_embed.py --against a05d89b [--images 10000] [--threads 1]
"""
from __future__ import annotations

import argparse
import cProfile
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
    ap.add_argument("--images", type=int, default=10000, help="--against: images (a cached image set)")
    ap.add_argument("--limit", type=int, default=None, help="--against: only the first LIMIT of those images")
    ap.add_argument("--threads", type=int, default=1, help="--against: torch threads")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.against:
        args.out = args.out or str(common.RESULTS / "score_path.json")
        return against(args)
    args.out = args.out or str(common.RESULTS / "profile_embed.json")
    import numpy as np
    import torch

    from pipeline.decode import decode_image
    from pipeline.embed import BatchItem, EmbedOptions, ShardEmbedder
    from pipeline.shards import expand_shards, iter_members
    from vae_model.noise import noise_for_keys, pixel_ids  # pixel_ids: hex of the on-device hash
    from vae_model.scoring import ScoreOptions, score_batch

    torch.set_num_threads(1)
    ck = str(common.ensure_checkpoint(quick=args.quick))
    data = common.image_set(2000 if args.quick else 5000)
    spec = expand_shards(str(data))[0]
    res: dict = {"shard": spec.name, "checkpoint": ck, "torch_threads": 1, "load_avg_start": common.load_average()}

    # 1. cProfile of the real thing
    with tempfile.TemporaryDirectory() as tmp:
        emb = ShardEmbedder(EmbedOptions(checkpoint=ck, out_url=tmp, skip_existing=False, torch_threads=1))
        emb.process(spec)  # warm-up: imports, oneDNN primitives
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        summary = emb.process(spec)
        prof.disable()
        n = summary["images_seen"]
        res["process_img_s"] = n / (time.perf_counter() - t0)
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(15)
    res["cprofile_top_tottime"] = s.getvalue().splitlines()[:40]
    print(f"ShardEmbedder.process, 1 thread: {res['process_img_s']:.0f} img/s on {n} images")
    print("\n".join(res["cprofile_top_tottime"][4:30]))

    # 2. stages timed alone (medians of repeats, microseconds per image)
    members = [m for m in iter_members(spec)]
    model, cfg = emb.ckpt.model, emb.cfg
    keys = [f"{spec.name}/{m.key}" for m in members]
    pix = np.stack([decode_image(m.data, 1, 28) for m in members])
    bs = 256
    batches = [(keys[i:i + bs], pix[i:i + bs]) for i in range(0, n, bs)]
    sopts = ScoreOptions(score="elbo", precision="fp32")
    model_cl = torch.nn.Module()  # placeholder, replaced below

    def t_read():
        list(iter_members(spec))

    def t_decode():
        for m in members:
            decode_image(m.data, 1, 28)

    def t_noise():
        for _, x in batches:
            noise_for_keys(pixel_ids(x), (cfg.latent_dim,), 0)

    xs_cl = [torch.from_numpy(x).contiguous(memory_format=torch.channels_last) for _, x in batches]

    def t_score():
        for _, x in batches:
            score_batch(model, x, None, sopts)

    def t_score_cl():
        for x in xs_cl:
            score_batch(model_cl, x, None, sopts)

    scored = [score_batch(model, x, None, sopts) for k, x in batches]

    def t_write():
        from pipeline.writer import AtomicParquetWriter
        with tempfile.TemporaryDirectory() as tmp:
            w = AtomicParquetWriter(f"{tmp}/x.parquet", emb.schema)
            for (k, _x), s in zip(batches, scored):
                rows = [BatchItem(kk, 0, None, None, None) for kk in k]
                w.write(emb._record_batch(spec, rows, s))
            w.commit({"a": "b"})

    import copy
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    stages = {"tar read (iter_members)": t_read, "decode_image": t_decode,
              "pixel_ids + noise_for_keys": t_noise, "score_batch (all of the model)": t_score,
              "score_batch, channels_last": t_score_cl, "_record_batch + Parquet write": t_write}
    times: dict[str, list[float]] = {k: [] for k in stages}
    for _ in range(args.repeats):
        for name, fn in stages.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    res["stage_us_per_image"] = {k: round(1e6 * common.median(v) / n, 1) for k, v in times.items()}
    # numerics of channels_last (fp32): same weights, same images, same (pixel-seeded) noise
    a, b = score_batch(model, batches[0][1], None, sopts), score_batch(model_cl, xs_cl[0], None, sopts)
    res["channels_last_max_abs_diff"] = {
        "elbo": float(np.abs(a["elbo"] - b["elbo"]).max()),
        "elbo_rel": float((np.abs(a["elbo"] - b["elbo"]) / np.abs(a["elbo"])).max()),
        "embedding": float(np.abs(a["embedding"] - b["embedding"]).max())}
    res["load_avg_end"] = common.load_average()
    print("\nper-image cost of each stage alone (us, 1 thread, median of %d):" % args.repeats)
    for k, v in res["stage_us_per_image"].items():
        print(f"  {k:32s} {v:8.1f}")
    print("channels_last vs default, max |diff| (fp32):", res["channels_last_max_abs_diff"])
    common.write_json(Path(args.out), res)


if __name__ == "__main__":
    main()
