"""Likelihood evaluation: mean ELBO and IWAE-k NLL of a dataset under a checkpoint."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from jobs.data import ShardImageDataset, list_specs
from vae_model.checkpoint import load_checkpoint
from vae_model.errors import ConfigError
from vae_model.storage import StorageOptions


@dataclass
class EvalOptions:
    iwae_k: int = 100
    batch_size: int = 256
    limit: int | None = None
    seed: int = 0
    iwae_chunk: int | None = None


@torch.no_grad()
def evaluate(data_url: str, checkpoint_url: str, opts: EvalOptions = EvalOptions(),
             storage_options: StorageOptions = None, progress: bool = False) -> dict:
    """Return {"images", "mean_elbo", "mean_neg_elbo", "iwae_k", "iwae_nll", "bits_per_dim", ...}.

    Bernoulli models are evaluated on a stochastic binarisation of the data seeded by ``seed``
    (the standard protocol for dynamically binarised MNIST); 8-bit models on the raw pixels.
    All figures are per image, in nats, averaged over images.
    """
    if opts.iwae_k < 1:
        raise ConfigError("--iwae-k must be >= 1")
    t0 = time.monotonic()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = load_checkpoint(checkpoint_url, storage_options, map_location=device)
    model, cfg = ckpt.model, ckpt.config
    ds = ShardImageDataset(list_specs(data_url, storage_options), cfg.channels, cfg.image_size,
                           storage_options=storage_options)
    g = torch.Generator(device=device).manual_seed(opts.seed)
    n, s_elbo, s_iwae, s_rec, s_kl = 0, 0.0, 0.0, 0.0, 0.0
    from tqdm.auto import tqdm

    bar = tqdm(unit="img", desc="evaluate", disable=not progress)
    for x in DataLoader(ds, batch_size=opts.batch_size):
        if opts.limit is not None and n >= opts.limit:
            break
        if opts.limit is not None:
            x = x[:opts.limit - n]
        x = x.to(device)
        if cfg.likelihood == "bernoulli":
            x = (torch.bernoulli(x.float() / 255.0, generator=g) * 255).to(torch.uint8)
        t = model.elbo(x, generator=g)
        ll = model.iwae(x, opts.iwae_k, generator=g, chunk_size=opts.iwae_chunk)
        n += len(x)
        s_elbo += (-t.neg_elbo).sum().item()
        s_rec += t.recon_nll.sum().item()
        s_kl += t.kl.sum().item()
        s_iwae += (-ll).sum().item()
        bar.update(len(x))
    bar.close()
    if n == 0:
        raise ConfigError(f"no decodable images in {data_url}")
    bpd = 1.0 / (cfg.num_dims * math.log(2))
    return {
        "images": n, "checkpoint": checkpoint_url, "model_id": ckpt.model_id, "likelihood": cfg.likelihood,
        "mean_elbo": s_elbo / n, "mean_neg_elbo": s_elbo / -n, "recon_nll": s_rec / n, "kl": s_kl / n,
        "iwae_k": opts.iwae_k, "iwae_nll": s_iwae / n,
        "elbo_bits_per_dim": -s_elbo / n * bpd, "bits_per_dim": s_iwae / n * bpd,
        "seconds": round(time.monotonic() - t0, 3),
    }
