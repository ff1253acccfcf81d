"""Likelihood evaluation: mean ELBO and IWAE-k NLL of a dataset under a checkpoint."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from jobs.data import ShardImageDataset, list_specs
from pipeline.options import trained_resize
from vae_model import losses
from vae_model.checkpoint import load_checkpoint
from vae_model.device import pick_device
from vae_model.errors import ConfigError
from vae_model.storage import StorageOptions


@dataclass
class EvalOptions:
    iwae_k: int = 100
    batch_size: int = 256
    limit: int | None = None
    seed: int = 0
    iwae_chunk: int | None = None

    def __post_init__(self) -> None:
        if self.iwae_k < 1:
            raise ConfigError("--iwae-k must be >= 1")


class TermMeans:
    """Means over images of per-sample terms (nats), summed batch by batch in float64 so that a
    mean over many batches does not depend on how the images were batched."""

    def __init__(self, *names: str) -> None:
        self.n = 0
        self.sums = {name: torch.zeros((), dtype=torch.float64) for name in names}

    def add(self, **terms: torch.Tensor) -> None:
        """One batch: a (B,) tensor per name."""
        self.n += len(next(iter(terms.values())))
        for name, values in terms.items():
            self.sums[name] += values.detach().double().sum().cpu()

    def mean(self, name: str) -> float:
        return (self.sums[name] / max(self.n, 1)).item()  # no images: 0

    def bits_per_dim(self, name: str, num_dims: int) -> float:
        """The mean of ``name`` (a negative log-likelihood) in bits per pixel value."""
        return losses.bits_per_dim(self.sums[name] / max(self.n, 1), num_dims).item()


@torch.no_grad()
def evaluate(data_url: str, checkpoint_url: str, opts: EvalOptions | None = None,
             storage_options: StorageOptions = None, progress: bool = False) -> dict:
    """Return {"images", "skipped", "mean_elbo", "mean_neg_elbo", "iwae_k", "iwae_nll", "bits_per_dim", ...}.

    ``skipped``: members that were not images or did not decode (each also a warning line), so
    ``images + skipped`` is every member read.

    Bernoulli models are evaluated on a stochastic binarisation of the data seeded by ``seed``
    (the standard protocol for dynamically binarised MNIST); 8-bit models on the raw pixels.
    All figures are per image, in nats, averaged over images.
    """
    opts = opts or EvalOptions()
    t0 = time.monotonic()
    device = pick_device()
    ckpt = load_checkpoint(checkpoint_url, storage_options, map_location=device)
    model, cfg = ckpt.model, ckpt.config
    ds = ShardImageDataset(list_specs(data_url, storage_options), cfg.channels, cfg.image_size,
                           storage_options=storage_options, resize=trained_resize(ckpt.meta))
    g = torch.Generator(device=device).manual_seed(opts.seed)
    means = TermMeans("neg_elbo", "recon_nll", "kl", "iwae_nll")
    from tqdm.auto import tqdm

    bar = tqdm(unit="img", desc="evaluate", disable=not progress)
    for x in DataLoader(ds, batch_size=opts.batch_size):
        if opts.limit is not None and means.n >= opts.limit:
            break
        if opts.limit is not None:
            x = x[:opts.limit - means.n]
        x = x.to(device)
        if cfg.likelihood == "bernoulli":
            x = (torch.bernoulli(x.float() / 255.0, generator=g) * 255).to(torch.uint8)
        t = model.elbo(x, generator=g)
        ll = model.iwae(x, opts.iwae_k, generator=g, chunk_size=opts.iwae_chunk)
        means.add(neg_elbo=t.neg_elbo, recon_nll=t.recon_nll, kl=t.kl, iwae_nll=-ll)
        bar.update(len(x))
    bar.close()
    if means.n == 0:
        raise ConfigError(f"no decodable images in {data_url}")
    return {
        "images": means.n, "skipped": ds.skipped, "checkpoint": checkpoint_url, "model_id": ckpt.model_id,
        "likelihood": cfg.likelihood,
        "mean_elbo": -means.mean("neg_elbo"), "mean_neg_elbo": means.mean("neg_elbo"),
        "recon_nll": means.mean("recon_nll"), "kl": means.mean("kl"),
        "iwae_k": opts.iwae_k, "iwae_nll": means.mean("iwae_nll"),
        "elbo_bits_per_dim": means.bits_per_dim("neg_elbo", cfg.num_dims),
        "bits_per_dim": means.bits_per_dim("iwae_nll", cfg.num_dims),
        "seconds": round(time.monotonic() - t0, 3),
    }
