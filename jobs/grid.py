"""PNG grids of uint8 images, written to any fsspec URL."""
from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

from vae_model.storage import StorageOptions, atomic_write_bytes


def make_grid(images: torch.Tensor | np.ndarray, nrow: int | None = None, pad: int = 2, scale: int = 1) -> Image.Image:
    """Tile uint8 images (N, C, H, W) into one PIL image, ``nrow`` per row (default: square);
    ``scale`` enlarges each tile that many times (nearest neighbour: the pixels as they are)."""
    arr = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if scale > 1:
        arr = arr.repeat(scale, axis=2).repeat(scale, axis=3)
    n, c, h, w = arr.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[y:y + h, x:x + w] = np.moveaxis(arr[i], 0, -1)
    return Image.fromarray(canvas[..., 0] if c == 1 else canvas)


def save_grid(images: torch.Tensor | np.ndarray, url: str, nrow: int | None = None,
              storage_options: StorageOptions = None, scale: int = 1) -> None:
    """Write :func:`make_grid`'s image to ``url`` as a PNG, in one atomic step."""
    buf = io.BytesIO()
    make_grid(images, nrow, scale=scale).save(buf, "PNG")
    atomic_write_bytes(url, buf.getvalue(), storage_options)
