"""Where one worker's time goes in ``ShardEmbedder.process`` (the unit of work of ``vaepipe embed``).

Single process, 1 torch thread (what each of the 2 multi_processing DirectRunner workers gets):

1. cProfile of ``ShardEmbedder.process`` on one 5000-image shard (the decode thread is invisible
   to cProfile, so stage 2 times it separately);
2. per-image cost of each stage on the same shard, timed alone: tar read, ``decode_image``,
   pixel-hash ids + ``noise_for_keys``, ``score_batch`` (model + float64 likelihood),
   ``_record_batch`` + Parquet write;
3. a candidate fix, side by side on the same images: ``score_batch`` with the model and input in
   channels_last memory format (fp32 both; numerics compared).

    .venv/bin/python benchmarks/profile_embed.py [--repeats 3] [--quick]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(common.RESULTS / "profile_embed.json"))
    args = ap.parse_args()
    import numpy as np
    import torch

    from pipeline.decode import decode_image
    from pipeline.embed import BatchItem, EmbedOptions, ShardEmbedder
    from pipeline.shards import expand_shards, iter_members
    from vae_model.noise import noise_for_keys, pixel_ids
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
