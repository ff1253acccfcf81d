"""Measure two candidate speed-ups of ``vaepipe embed`` without editing library code.

  c-single            ``vaepipe embed`` single process (in_memory DirectRunner), as shipped
  c-single-cl         the same, with ShardEmbedder's model and input batches in channels_last
                      memory format (patched in this process, so single-process only)
  c-multi             ``vaepipe embed`` on 2 worker processes, as shipped (fp32)
  c-multi-bf16        the same with ``--precision bf16`` (opt-in; rows then differ ~1e-4 relative)

Pairs run back to back, alternating order, ``--repeats`` times; prints medians and writes
benchmarks/results/fix_probe.json.

    .venv/bin/python benchmarks/fix_probe.py [--images 50000] [--repeats 2]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def child_channels_last(data: str, out: str, ck: str) -> None:
    """run_embed in this process with ShardEmbedder patched to use channels_last."""
    import numpy as np
    import torch

    import pipeline.embed as embed
    from pipeline.options import EmbedOptions
    from pipeline.run import run_embed

    init, score = embed.ShardEmbedder.__init__, embed.score_batch

    def patched_init(self, *a, **kw):
        init(self, *a, **kw)
        self.ckpt.model.to(memory_format=torch.channels_last)

    def patched_score(model, images, keys, opts, device="cpu"):
        x = torch.from_numpy(np.asarray(images)).contiguous(memory_format=torch.channels_last)
        return score(model, x, keys, opts, device)

    embed.ShardEmbedder.__init__, embed.score_batch = patched_init, patched_score
    run_embed(data, EmbedOptions(checkpoint=ck, out_url=out), ["--direct_num_workers=1",
                                                                "--direct_running_mode=in_memory"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=50000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_channels_last(*args.child)
        return
    ck = str(common.ensure_checkpoint())
    data = str(common.image_set(args.images))
    vp = str(common.VENV_BIN / "vaepipe")
    single, multi = ["--direct_num_workers=1", "--direct_running_mode=in_memory"], \
        ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]

    def cmd(v: str, out: str) -> list[str]:
        if v == "c-single-cl":
            return [sys.executable, str(Path(__file__).resolve()), "--child", data, out, ck]
        base = [vp, "embed", data, "--checkpoint", ck, "--out", out]
        return {"c-single": base + single, "c-multi": base + multi,
                "c-multi-bf16": base + ["--precision", "bf16"] + multi}[v]

    rows = []
    for rep in range(args.repeats):
        for pair in (("c-single", "c-single-cl"), ("c-multi", "c-multi-bf16")):
            for v in pair if rep % 2 == 0 else pair[::-1]:
                out = str(common.BENCH / "out" / f"probe-{v}-{uuid.uuid4().hex[:8]}")
                r = common.run_child(cmd(v, out))
                r.pop("stdout")
                shutil.rmtree(out, ignore_errors=True)
                row = {"variant": v, "img_s": args.images / r["wall_s"] if r["rc"] == 0 else None,
                       "cpu_ms_per_img": 1000 * r["cpu_s"] / args.images, **r}
                rows.append(row)
                common.log(f"{v:13s} img/s={row['img_s'] or 0:7.0f} cpu={row['cpu_ms_per_img']:.2f}ms/img rc={r['rc']}")
    med = {v: common.median([r["img_s"] for r in rows if r["variant"] == v])
           for v in ("c-single", "c-single-cl", "c-multi", "c-multi-bf16")}
    ratios = {"channels_last (single)": med["c-single-cl"] / med["c-single"],
              "bf16 (multi)": med["c-multi-bf16"] / med["c-multi"]}
    print(common.table([[v, x] for v, x in med.items()], ["variant", "img/s (median)"]))
    print("speed-ups: " + ", ".join(f"{k} x{v:.3f}" for k, v in ratios.items()))
    common.write_json(common.RESULTS / "fix_probe.json", {"images": args.images, "medians": med, "ratios": ratios,
                                                          "runs": rows})


if __name__ == "__main__":
    main()
