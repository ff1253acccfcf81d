"""Generation: prior samples, reconstructions and latent interpolations as PNG grids.

The model runs on :func:`vae_model.device.pick_device`'s device. Prior samples draw their
latents from a generator on that device (a seed gives the same grid on the same kind of device);
interpolations between random prior latents draw them on the CPU (the same grid anywhere)."""
from __future__ import annotations

import torch

from jobs.data import ShardImageDataset, list_specs, load_tensor
from jobs.grid import save_grid
from vae_model.checkpoint import load_checkpoint
from vae_model.device import pick_device
from vae_model.errors import ConfigError
from vae_model.model import VAE
from vae_model.storage import StorageOptions


def _model(url: str, so: StorageOptions) -> VAE:
    """The checkpoint's model (in eval mode) on the device of the policy."""
    return load_checkpoint(url, so, map_location=pick_device()).model


def _device(model: VAE) -> torch.device:
    return next(model.parameters()).device


def _images(data_url: str, model: VAE, n: int, so: StorageOptions) -> torch.Tensor:
    """The first n decodable images of ``data_url`` at the model's size, uint8 (N, C, H, W),
    on the model's device."""
    cfg = model.cfg
    return load_tensor(ShardImageDataset(list_specs(data_url, so), cfg.channels, cfg.image_size,
                                         storage_options=so), n).to(_device(model))


def generate_samples(checkpoint_url: str, out_url: str, n: int = 64, seed: int = 0, temperature: float = 1.0,
                     storage_options: StorageOptions = None, scale: int = 1, stochastic: bool = False) -> int:
    """n images from the prior, tiled into one PNG: the pixel means, or with ``stochastic`` a draw of
    every pixel from p(x|z) (ancestral, in raster order with a pixel context). Returns images written."""
    if n < 1 or temperature <= 0:
        raise ConfigError("--n must be >= 1 and --temperature > 0")
    model = _model(checkpoint_url, storage_options)
    imgs = model.sample(n, generator=torch.Generator(_device(model)).manual_seed(seed), temperature=temperature,
                        stochastic_pixels=stochastic)
    save_grid(imgs, out_url, storage_options=storage_options, scale=scale)
    return n


def generate_reconstructions(checkpoint_url: str, data_url: str, out_url: str, n: int = 32,
                             storage_options: StorageOptions = None, scale: int = 1) -> int:
    """The first n images of ``data_url`` (odd rows) above their reconstructions (even rows)."""
    model = _model(checkpoint_url, storage_options)
    x = _images(data_url, model, n, storage_options)
    if len(x) == 0:
        raise ConfigError(f"no decodable images in {data_url}")
    recon = model.reconstruct(x)
    per_row = 8
    rows = []
    for i in range(0, len(x), per_row):
        rows += [x[i:i + per_row], recon[i:i + per_row]]
    save_grid(torch.cat(rows), out_url, nrow=per_row, storage_options=storage_options, scale=scale)
    return len(x)


def generate_interpolations(checkpoint_url: str, out_url: str, n: int = 8, steps: int = 10, seed: int = 0,
                            data_url: str | None = None, storage_options: StorageOptions = None, scale: int = 1) -> int:
    """n rows of ``steps`` images each: interpolations between pairs of real images (posterior
    means, when ``data_url`` is given) or of random prior latents."""
    if steps < 2 or n < 1:
        raise ConfigError("--steps must be >= 2 and --n >= 1")
    model = _model(checkpoint_url, storage_options)
    rows = []
    if data_url:
        x = _images(data_url, model, 2 * n, storage_options)
        if len(x) < 2:
            raise ConfigError(f"--interpolate needs at least 2 decodable images in {data_url}")
        for i in range(0, len(x) - 1, 2):
            rows.append(model.interpolate(x[i], x[i + 1], steps))
    else:
        g = torch.Generator().manual_seed(seed)  # on the CPU: the same rows whatever the device
        for _ in range(n):
            a, b = torch.randn((2, model.cfg.latent_dim), generator=g).to(_device(model))
            rows.append(model.interpolate_latents(a, b, steps))
    save_grid(torch.cat(rows), out_url, nrow=steps, storage_options=storage_options, scale=scale)
    return sum(len(r) for r in rows)
