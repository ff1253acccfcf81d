"""Training speed: ``jobs.train.train`` against a minimal pytorch/examples-style loop, and bf16 vs fp32.

Same model class ``VAE(VAEConfig.default_for(28, 1, latent_dim=32))``, same N Fashion-MNIST
images, batch size 128, E passes (epochs) of ceil(N / 128) steps each. Repeat r uses seed r for
every variant (the same initial weights; each loop draws its own data order), so the spread of
held-out losses over seeds is measured, and the loss comparison is paired by seed.

  ours            ``train(TrainConfig(...))`` as a user runs it: epoch 1 streams the shards through a
                  DataLoader worker (decode + shuffle buffer), later epochs use the decoded images
                  kept in memory; AdamW (weight decay 1e-4), KL warm-up, adaptive gradient clipping
                  (5x the median recent norm), precision "auto" (bf16 autocast on this AMX/AVX-512 CPU)
  ours-fp32-nowu  the same with precision fp32 and no KL warm-up (the minimal loop's objective);
                  clipping, weight decay and the streaming first pass stay as shipped
  minimal-fp32    pytorch/examples ``vae/main.py`` style: data in memory, DataLoader(shuffle=True),
                  Adam(1e-3), loss = mean -ELBO
  minimal-bf16    the same step under ``torch.autocast("cpu", torch.bfloat16)``

Reported per variant (medians of repeats, each in its own process): training images/s (the
training loop only: data loading included, validation/checkpointing excluded) of the first pass
and of the later passes (steady state; the minimal loop has its data in memory from the start),
mean training -ELBO over the last pass, and held-out -ELBO (fp32, fixed noise) on 2000
Fashion-MNIST test images after all passes. For bf16 vs fp32 the script also reports the relative difference of
per-image -ELBO on identical weights (numerics of one forward pass).

    .venv/bin/python benchmarks/train_speed.py            # full: 12800 images x 2 passes x 3 (~12 min)
    .venv/bin/python benchmarks/train_speed.py --quick    # smoke: 1280 images (10 steps) x 2 passes x 1
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BATCH = 128
SEED = 0


def _data(n: int):
    """(training tensor, held-out tensor) of uint8 images, decoded like training decodes them."""
    from jobs.data import ShardImageDataset, list_specs, load_tensor

    train_dir, val_dir = common.train_set(n), common.image_set(2000)
    x = load_tensor(ShardImageDataset(list_specs(str(train_dir)), 1, 28, split="all"))
    x_val = load_tensor(ShardImageDataset(list_specs(str(val_dir)), 1, 28, split="all"))
    return train_dir, val_dir, x, x_val


def child(variant: str, n: int, epochs: int, seed: int) -> dict:
    import torch

    from jobs.train import TrainConfig, evaluate_tensor, train
    from vae_model.config import VAEConfig
    from vae_model.model import VAE

    train_dir, val_dir, x, x_val = _data(n)
    assert len(x) == n, (len(x), n)
    model_kw = {"latent_dim": 32}
    if variant.startswith("ours"):
        fp32 = variant == "ours-fp32-nowu"
        with tempfile.TemporaryDirectory() as tmp:
            out = f"{tmp}/m.safetensors"
            t0 = time.perf_counter()
            res = train(TrainConfig(data_url=str(train_dir), out=out, val_url=str(val_dir), val_limit=2000,
                                    epochs=epochs, patience=epochs,
                                    batch_size=BATCH, seed=seed, precision="fp32" if fp32 else "auto",
                                    kl_warmup_steps=0 if fp32 else 1000, quantile_images=256, quantile_iwae_k=4,
                                    model=dict(model_kw)), progress=False)
            wall = time.perf_counter() - t0
            lines = [json.loads(line) for line in Path(out + ".metrics.jsonl").read_text().splitlines()]
            ep = [rec for rec in lines if rec["event"] == "epoch"]
            # the weights after the last pass (the checkpoint is the best by validation: maybe earlier)
            model = VAE(VAEConfig.default_for(28, 1, **model_kw))
            model.load_state_dict(torch.load(out + ".resume.pt", weights_only=True)["model"])
            held = evaluate_tensor(model, x_val, 512, SEED, precision="fp32")
            clipped = ep[-1].get("clipped_steps")
        steady = [e["img_per_s"] for e in ep[1:]]
        return {"variant": variant, "steps": res.steps, "images": n * epochs, "img_s_first": ep[0]["img_per_s"],
                "img_s": sum(steady) / len(steady) if steady else ep[0]["img_per_s"],
                "data": [e["data"] for e in ep], "train_neg_elbo": ep[-1]["train_neg_elbo"], "last10_neg_elbo": None,
                "heldout_neg_elbo": held["neg_elbo"], "precision": ep[-1]["precision"], "train_call_s": wall,
                "clipped_steps": clipped, "seed": seed}

    bf16 = variant == "minimal-bf16"
    torch.manual_seed(seed)
    model = VAE(VAEConfig.default_for(28, 1, **model_kw))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=BATCH, shuffle=True)
    model.train()
    rates = []
    for _ in range(epochs):
        losses, seen = [], 0
        t0 = time.perf_counter()
        for (xb,) in loader:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                t = model(xb)
            loss = t.neg_elbo.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            seen += len(xb)
        rates.append(seen / (time.perf_counter() - t0))
    held = evaluate_tensor(model, x_val, 512, SEED, precision="fp32")
    steady = rates[1:] or rates
    out = {"variant": variant, "steps": len(losses) * epochs, "images": seen * epochs, "img_s_first": rates[0],
           "img_s": sum(steady) / len(steady),
           "train_neg_elbo": sum(loss * min(BATCH, n - i * BATCH) for i, loss in enumerate(losses)) / n,
           "last10_neg_elbo": sum(losses[-10:]) / len(losses[-10:]), "heldout_neg_elbo": held["neg_elbo"],
           "precision": "bf16" if bf16 else "fp32", "seed": seed}
    if not bf16:  # numerics: the same weights, the same noise, one forward in fp32 and in bf16
        model.eval()
        xb, eps = x_val[:512], torch.randn(512, 32, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            a = model.elbo(xb, eps=eps).neg_elbo
            with torch.autocast("cpu", dtype=torch.bfloat16):
                b = model.elbo(xb, eps=eps).neg_elbo
        rel = ((b - a).abs() / a.abs()).double()
        out["bf16_vs_fp32_forward"] = {"median_rel_diff": rel.median().item(), "max_rel_diff": rel.max().item(),
                                       "mean_abs_diff_nats": (b - a).abs().mean().item()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=12800)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2, help="passes over the images (>= 2 shows the steady state)")
    ap.add_argument("--quick", action="store_true", help="1280 images (10 steps), 1 repeat")
    ap.add_argument("--out", default=str(common.RESULTS / "train_speed.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.images, args.epochs, args.seed)), flush=True)
        return
    if args.quick:
        args.images, args.repeats = 1280, 1
        if args.out == str(common.RESULTS / "train_speed.json"):
            args.out = str(common.RESULTS / "train_speed-quick.json")
    common.train_set(args.images)
    common.image_set(2000)
    others = common.busy_others()
    if others:
        common.log("other busy processes on this machine: " + "; ".join(others))
    variants = ["ours", "ours-fp32-nowu", "minimal-fp32", "minimal-bf16"]
    rows = []
    t_all = time.perf_counter()
    for rep in range(args.repeats):
        for v in variants if rep % 2 == 0 else variants[::-1]:
            r = common.run_child([sys.executable, str(Path(__file__).resolve()), "--child", v,
                                  "--images", str(args.images), "--epochs", str(args.epochs), "--seed", str(rep)])
            row = {**common.last_json(r.pop("stdout")), "rc": r["rc"], "wall_s": r["wall_s"], "cpu_s": r["cpu_s"],
                   "maxrss_mb": r["maxrss_mb"], "load_avg": common.load_average()}
            rows.append(row)
            common.log(f"{v:15s} img/s={row.get('img_s', 0):7.1f} train -ELBO={row.get('train_neg_elbo', math.nan):8.1f} "
                       f"held-out -ELBO={row.get('heldout_neg_elbo', math.nan):8.1f} rc={r['rc']}")
    summary = {}
    for v in variants:
        mine = [r for r in rows if r.get("variant") == v and r["rc"] == 0]
        summary[v] = {k: common.median([r.get(k) for r in mine]) for k in
                      ("img_s_first", "img_s", "train_neg_elbo", "last10_neg_elbo", "heldout_neg_elbo", "steps")}
        summary[v]["steps"] = int(summary[v]["steps"]) if summary[v]["steps"] else None
        summary[v]["repeats"] = len(mine)
        summary[v]["precision"] = mine[0]["precision"] if mine else None
    ratios = {}
    for a, b in (("ours", "minimal-fp32"), ("ours-fp32-nowu", "minimal-fp32"), ("minimal-bf16", "minimal-fp32"),
                 ("ours", "ours-fp32-nowu")):
        x, y = summary[a]["img_s"], summary[b]["img_s"]
        ratios[f"{a} / {b}"] = round(x / y, 3) if x and y else None
        x1, y1 = summary[a]["img_s_first"], summary[b]["img_s_first"]
        ratios[f"{a} / {b} (pass 1)"] = round(x1 / y1, 3) if x1 and y1 else None
    # Loss at the same steps, paired by seed: relative held-out difference against minimal-fp32,
    # next to the seed-to-seed spread of minimal-fp32 itself (the noise floor of "same loss").
    by_seed = {(r["variant"], r["seed"]): r["heldout_neg_elbo"] for r in rows if r["rc"] == 0 and "seed" in r}
    seeds = sorted({sd for (_, sd) in by_seed})
    ref = [by_seed[("minimal-fp32", sd)] for sd in seeds if ("minimal-fp32", sd) in by_seed]
    loss = {"seeds": seeds, "minimal-fp32 spread over seeds (max-min)/mean":
            round((max(ref) - min(ref)) / (sum(ref) / len(ref)), 4) if len(ref) > 1 else None}
    for v in variants:
        if v == "minimal-fp32":
            continue
        diffs = [(by_seed[(v, sd)] - by_seed[("minimal-fp32", sd)]) / by_seed[("minimal-fp32", sd)]
                 for sd in seeds if (v, sd) in by_seed and ("minimal-fp32", sd) in by_seed]
        loss[f"{v} vs minimal-fp32, paired rel. diff"] = (
            {"mean": round(sum(diffs) / len(diffs), 4), "min": round(min(diffs), 4), "max": round(max(diffs), 4)}
            if diffs else None)
    numerics = [r["bf16_vs_fp32_forward"] for r in rows if "bf16_vs_fp32_forward" in r]
    print(f"\nTraining, {args.images} images x {args.epochs} passes, batch {BATCH}, "
          f"{summary['minimal-fp32']['steps']} steps (medians of {args.repeats})")
    print(common.table([[v, s["precision"], s["img_s_first"], s["img_s"], s["train_neg_elbo"], s["last10_neg_elbo"],
                         s["heldout_neg_elbo"], s["repeats"]] for v, s in summary.items()],
                       ["variant", "precision", "img/s pass 1", "img/s later", "train -ELBO", "last-10 -ELBO",
                        "held-out -ELBO", "reps"]))
    print("\nimg/s ratios: " + ", ".join(f"{k} = {v}" for k, v in ratios.items()))
    print("held-out -ELBO at the same steps, paired by seed: " + json.dumps(loss))
    if numerics:
        print("bf16 vs fp32, one forward on identical weights (per-image -ELBO): " + json.dumps(numerics[0]))
    common.write_json(Path(args.out), {"images": args.images, "epochs": args.epochs, "batch_size": BATCH, "repeats": args.repeats,
                                       "seconds": round(time.perf_counter() - t_all, 1),
                                       "busy_other_processes_at_start": others, "summary": summary,
                                       "ratios": ratios, "heldout_loss": loss, "bf16_vs_fp32_forward": numerics, "runs": rows})


if __name__ == "__main__":
    main()
