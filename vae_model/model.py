"""Convolutional VAE: encoder -> DiagonalGaussian, decoder -> pixel likelihood.

Images enter as uint8 tensors (B, C, H, W) with values 0..255; ``prepare`` turns them into
the network input and the likelihood's target (binarised for ``bernoulli``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from . import losses
from .config import VAEConfig
from .context import ContextPixels, PixelContext
from .distributions import PIXEL_LIKELIHOODS, DiagonalGaussian, pixel_distribution, standard_normal_log_prob
from .noise import NOISE_BLOCK, iwae_noise_for_keys, noise_for_keys  # noqa: F401  (moved to vae_model.noise; old imports keep working)

# Budget for one IWAE chunk: decoder outputs of at most this many pixel values at once.
IWAE_CHUNK_VALUES = 1 << 23


@dataclass
class ElboTerms:
    """Per-image ELBO decomposition; every field is (B,) except ``mean`` (B, latent_dim)."""

    recon_nll: torch.Tensor  # -E_q[log p(x|z)], nats
    kl: torch.Tensor  # KL(q(z|x) || p(z)), nats
    neg_elbo: torch.Tensor  # recon_nll + kl, nats (>= -log p(x))
    bits_per_dim: torch.Tensor  # neg_elbo in bits per pixel value
    mean: torch.Tensor  # posterior mean: the embedding
    kl_dims: torch.Tensor | None = None  # (B, latent_dim): the KL of each latent dimension


def _level(cin: int, cout: int, down: bool) -> nn.Sequential:
    if down:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1), nn.SiLU(), nn.Conv2d(cout, cout, 4, 2, 1), nn.SiLU())
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, 2, 1), nn.SiLU(), nn.Conv2d(cout, cout, 3, 1, 1), nn.SiLU())


def _groups(channels: int) -> int:
    """GroupNorm groups: 8 channels or more per group, at most 32 groups."""
    return max(g for g in (1, 2, 4, 8, 16, 32) if channels % g == 0 and channels // g >= 8 or g == 1)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, twice, plus the input. GroupNorm normalises each image on its
    own, so a row does not depend on its batch (and small training batches are fine). The
    second conv starts at zero: each block starts as the identity, which keeps deep trunks
    trainable from the first step."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        g = _groups(channels)
        self.body = nn.Sequential(nn.GroupNorm(g, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, 1, 1),
                                  nn.GroupNorm(g, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, 1, 1))
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _res_trunk_down(cfg: VAEConfig) -> nn.Sequential:
    """Stem conv, then per level: residual blocks at that width and a stride-2 conv to the next."""
    w = cfg.widths
    layers: list[nn.Module] = [nn.Conv2d(cfg.channels, w[0], 3, 1, 1)]
    for i, width in enumerate(w):
        layers += [ResBlock(width) for _ in range(cfg.blocks)]
        layers.append(nn.Conv2d(width, w[min(i + 1, len(w) - 1)], 4, 2, 1))
    layers += [nn.GroupNorm(_groups(w[-1]), w[-1]), nn.SiLU()]
    return nn.Sequential(*layers)


def _res_trunk_up(cfg: VAEConfig, out_channels: int) -> nn.Sequential:
    """The mirror of :func:`_res_trunk_down`: per level a stride-2 transposed conv, then residual
    blocks; a normalised 3x3 conv to the pixel likelihood's parameters."""
    rev = cfg.widths[::-1]
    layers: list[nn.Module] = []
    for i, width in enumerate(rev):
        layers.append(nn.ConvTranspose2d(rev[max(i - 1, 0)], width, 4, 2, 1))
        layers += [ResBlock(width) for _ in range(cfg.blocks)]
    layers += [nn.GroupNorm(_groups(rev[-1]), rev[-1]), nn.SiLU(), nn.Conv2d(rev[-1], out_channels, 3, 1, 1)]
    return nn.Sequential(*layers)


def num_pixel_params(cfg: VAEConfig) -> int:
    """Decoder output channels: the pixel likelihood's parameters per pixel."""
    return PIXEL_LIKELIHOODS[cfg.likelihood].num_params(cfg.channels, cfg.mixtures)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        if cfg.arch == "resnet":
            self.convs = _res_trunk_down(cfg)
        else:
            chans = (cfg.channels, *cfg.widths)
            self.convs = nn.Sequential(*[_level(a, b, down=True) for a, b in zip(chans[:-1], chans[1:])])
        flat = cfg.widths[-1] * cfg.bottom_size ** 2
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(flat, cfg.hidden_dim), nn.SiLU(),
                                  nn.Linear(cfg.hidden_dim, 2 * cfg.latent_dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.head(self.convs(x))  # (B, 2D)
        mean, logvar = h.float().chunk(2, dim=-1)
        return mean, logvar


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        flat = cfg.widths[-1] * cfg.bottom_size ** 2
        self.head = nn.Sequential(nn.Linear(cfg.latent_dim, cfg.hidden_dim), nn.SiLU(),
                                  nn.Linear(cfg.hidden_dim, flat), nn.SiLU())
        if cfg.arch == "resnet":
            self.convs = _res_trunk_up(cfg, num_pixel_params(cfg))
            self.out = nn.Identity()
        else:
            rev = cfg.widths[::-1]
            self.convs = nn.Sequential(*[_level(a, b, down=False) for a, b in zip(rev, (*rev[1:], rev[-1]))])
            self.out = nn.Conv2d(rev[-1], num_pixel_params(cfg), 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        h = self.head(z).view(-1, c.widths[-1], c.bottom_size, c.bottom_size)
        return self.out(self.convs(h)).float()  # (B, params, H, W)


class VAE(nn.Module):
    """A convolutional VAE. ``encode`` returns a :class:`DiagonalGaussian`."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.context = (PixelContext(cfg.channels, num_pixel_params(cfg), cfg.context_width, cfg.context_layers)
                        if cfg.context_layers else None)

    # -- data ----------------------------------------------------------------------------
    def prepare(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images (B, C, H, W) -> (network input in [-1, 1], likelihood target).

        ``bernoulli`` binarises: stochastically (dynamic binarisation) when a generator is
        given, else deterministically at 0.5 so that scoring is reproducible.
        """
        c = self.cfg
        if x.dim() != 4 or x.shape[1:] != (c.channels, c.image_size, c.image_size):
            raise ValueError(f"expected images of shape (B, {c.channels}, {c.image_size}, {c.image_size}), "
                             f"got {tuple(x.shape)}")
        xf = x.float()
        if c.likelihood == "bernoulli":
            p = xf / 255.0
            target = torch.bernoulli(p, generator=generator) if generator is not None else (p >= 0.5).float()
            return target * 2.0 - 1.0, target
        return xf / 127.5 - 1.0, xf

    # -- model ---------------------------------------------------------------------------
    def encode(self, x_in: torch.Tensor) -> DiagonalGaussian:
        mean, logvar = self.encoder(x_in)
        return DiagonalGaussian(mean, logvar, self.cfg.logvar_min, self.cfg.logvar_max)

    def decode(self, z: torch.Tensor, precise: bool = False):
        """z (..., D) -> pixel distribution over (prod(...), C, H, W) (with ``context_layers``, a
        :class:`~vae_model.context.ContextPixels`: autoregressive over a small causal window).

        ``precise`` evaluates the likelihood in float64: its per-pixel terms cancel and sum over
        thousands of pixels, which in float32 leaves rounding noise that depends on batch size
        and threads, as large as the 1e-5 to which rows must reproduce. Scoring uses it;
        training does not need it."""
        params = self.decoder(z.reshape(-1, z.shape[-1]))
        c = self.cfg
        if self.context is not None:
            return ContextPixels(c.likelihood, params, c.channels, c.mixtures, self.context, precise)
        return pixel_distribution(c.likelihood, params.double() if precise else params, c.channels, c.mixtures)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> ElboTerms:
        return self.elbo(x, generator=generator)

    def elbo(self, x: torch.Tensor, generator: torch.Generator | None = None,
             eps: torch.Tensor | None = None, sample: bool = True, precise: bool = False) -> ElboTerms:
        """Single-sample ELBO per image. Training passes a generator (dynamic binarisation);
        scoring passes ``eps`` (B, D) so each image's noise does not depend on its batch."""
        x_in, target = self.prepare(x, generator)
        q = self.encode(x_in)
        z = q.sample(generator=generator, eps=eps) if sample else q.mode()
        recon = self.decode(z, precise).nll(target.double() if precise else target)
        kl_dims = q.kl_per_dim()
        kl = kl_dims.sum(-1).double() if precise else kl_dims.sum(-1)
        neg = losses.negative_elbo(recon, kl)
        return ElboTerms(recon, kl, neg, losses.bits_per_dim(neg, self.cfg.num_dims), q.mean, kl_dims)

    def iwae(self, x: torch.Tensor, k: int, generator: torch.Generator | None = None,
             eps: torch.Tensor | Callable[[int, int], torch.Tensor] | None = None, chunk_size: int | None = None,
             binarize_generator: torch.Generator | None = None, precise: bool = False) -> torch.Tensor:
        """IWAE-k estimate of log p(x) per image (B,), nats. Chunked over k to bound memory.

        ``eps`` gives standard normal noise for deterministic scoring: a (k, B, D) tensor, or a
        function ``(start, n) -> (n, B, D)`` for samples ``start..start+n`` (memory stays bounded
        by the chunk, whatever k is: :func:`vae_model.noise.iwae_noise_for_keys`).
        """
        if k < 1:
            raise ValueError("k must be >= 1")
        x_in, target = self.prepare(x, binarize_generator)
        q = self.encode(x_in)
        b = x.shape[0]
        if chunk_size is None:
            per_sample = b * self.cfg.image_size ** 2 * num_pixel_params(self.cfg)
            chunk_size = max(1, min(k, IWAE_CHUNK_VALUES // max(per_sample, 1)))
        dtype = torch.float64 if precise else torch.float32
        target = target.to(dtype)
        acc = torch.full((b,), -math.inf, device=x.device, dtype=dtype)
        for start in range(0, k, chunk_size):
            n = min(chunk_size, k - start)
            eps_n = None if eps is None else eps(start, n) if callable(eps) else eps[start:start + n]
            z = q.sample(generator=generator, n=n, eps=None if eps_n is None else eps_n.to(x.device))  # (n, B, D)
            target_n = target.unsqueeze(0).expand(n, *target.shape).reshape(n * b, *target.shape[1:])
            log_px = -self.decode(z, precise).nll(target_n).view(n, b)
            log_w = losses.importance_log_weights(log_px, standard_normal_log_prob(z).to(dtype),
                                                  q.log_prob(z).to(dtype))
            acc = torch.logaddexp(acc, torch.logsumexp(log_w, dim=0))
        return acc - math.log(k)

    # -- generation ----------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0,
               stochastic_pixels: bool = False) -> torch.Tensor:
        """n images from the prior, uint8 (n, C, H, W); pixel means unless ``stochastic_pixels``."""
        dev = next(self.parameters()).device
        z = torch.randn((n, self.cfg.latent_dim), generator=generator, device=dev) * temperature
        px = self.decode(z)
        img = px.sample_image(generator) if stochastic_pixels else px.mean_image()
        return img.round().clamp(0, 255).to(torch.uint8)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decode the posterior mean of each image: uint8 (B, C, H, W)."""
        q = self.encode(self.prepare(x)[0])
        return self.decode(q.mode()).mean_image().round().clamp(0, 255).to(torch.uint8)

    @torch.no_grad()
    def interpolate(self, a: torch.Tensor, b: torch.Tensor, steps: int = 8) -> torch.Tensor:
        """Images along the line between the posterior means of ``a`` and ``b`` (each (C, H, W)
        uint8): uint8 (steps, C, H, W), endpoints included."""
        q = self.encode(self.prepare(torch.stack([a, b]))[0])
        return self.interpolate_latents(q.mean[0], q.mean[1], steps)

    @torch.no_grad()
    def interpolate_latents(self, za: torch.Tensor, zb: torch.Tensor, steps: int = 8) -> torch.Tensor:
        """Decoded pixel means along the line from latent ``za`` to ``zb`` (each (D,)): uint8
        (steps, C, H, W), endpoints included."""
        if steps < 2:
            raise ValueError("steps must be >= 2")
        t = torch.linspace(0, 1, steps, device=za.device).unsqueeze(1)  # (steps, 1)
        z = (1 - t) * za + t * zb  # (steps, D)
        return self.decode(z).mean_image().round().clamp(0, 255).to(torch.uint8)

