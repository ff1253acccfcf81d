"""Per-image noise for deterministic scoring: a score depends on the image alone.

Stochastic scores (the ELBO's one reparameterised sample, IWAE's k samples) draw their noise
from a stream seeded by a hash of a key, one stream per image. The pipeline's key is the
image's pixels (:func:`pixel_ids`), so an image gets the same noise, hence the same score,
whatever batch, worker, runner or storage location scores it (README, "Anomaly scores").
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

NOISE_BLOCK = 64  # importance samples per seeded block of a key's IWAE noise stream


def pixel_ids(images: np.ndarray) -> list[str]:
    """Content ids of uint8 images (B, C, H, W): the seeds of their per-image noise."""
    return [hashlib.blake2b(np.ascontiguousarray(im).tobytes(), digest_size=16).hexdigest() for im in images]


def noise_for_keys(keys: list[str], shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Standard normal noise, one independent stream per key: (*shape, len(keys), D) where
    ``shape`` is (..., D) minus the batch dim, e.g. (D,) -> (B, D), (K, D) -> (K, B, D).

    Seeded by a hash of the key, so an image gets the same noise whatever batch, worker or
    runner scores it.
    """
    out = np.empty((len(keys), *shape), dtype=np.float32)
    for i, key in enumerate(keys):
        h = int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "little")
        out[i] = np.random.default_rng(h).standard_normal(shape, dtype=np.float32)
    t = torch.from_numpy(out)
    return t if len(shape) == 1 else t.movedim(0, -2)


def iwae_noise_for_keys(keys: list[str], latent_dim: int, seed: int, start: int, n: int) -> torch.Tensor:
    """Samples ``start..start+n`` of each key's IWAE noise stream: (n, B, D).

    The stream is cut into blocks of :data:`NOISE_BLOCK` samples; block 0 is the key's
    :func:`noise_for_keys` stream, block j > 0 is seeded by the key and j. Any sample range can
    be drawn without drawing the samples before it, so IWAE with a huge k holds one chunk of
    noise at a time, and the noise does not depend on how k is chunked.
    """
    first, last = start // NOISE_BLOCK, (start + n - 1) // NOISE_BLOCK
    blocks = [noise_for_keys(keys, (NOISE_BLOCK, latent_dim), seed) if j == 0 else
              noise_for_keys([f"{key}#{j}" for key in keys], (NOISE_BLOCK, latent_dim), seed)
              for j in range(first, last + 1)]
    offset = start - first * NOISE_BLOCK
    return torch.cat(blocks)[offset:offset + n]  # (n, B, D)
