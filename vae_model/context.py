"""Local autoregressive pixel context: p(x|z) = prod_i p(x_i | z, x_<i within a small window).

A factorised decoder must carry every pixel's detail through z or pay its full entropy; natural
photographs have strong local correlations (edges, texture, smooth gradients) that lossless image
coders exploit by predicting each pixel from its causal neighbours. This head does the same inside
the likelihood, as PixelVAE (Gulrajani et al. 2017) does with a deeper stack: a few *masked*
convolutions over the image (raster order: a pixel sees only the rows above it and the pixels to
its left in its own row), conditioned on the decoder's per-pixel parameters, adjust those
parameters. The likelihood stays exact and normalised (each pixel's distribution is the base
likelihood with parameters that depend on z and on earlier pixels only), so ELBO and IWAE stay
lower bounds on log p(x).

Cost: scoring is still one pass (the image is known: teacher forcing), a few full-resolution convs
more. Sampling and reconstruction become sequential over the H*W pixels; each step evaluates the
head only on the window its receptive field covers, so a 32 px image takes 1,024 small steps.
The head's output layer starts at zero: an untrained head is exactly the factorised model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .distributions import pixel_distribution

FIRST_KERNEL = 5  # the first (strictly causal) layer's kernel


class MaskedConv2d(nn.Conv2d):
    """A conv whose kernel sees only earlier pixels in raster order (``include_center``: and the
    pixel itself, for layers whose input at that pixel already excludes the pixel's value)."""

    def __init__(self, cin: int, cout: int, kernel: int, include_center: bool) -> None:
        super().__init__(cin, cout, kernel, padding=kernel // 2)
        mask = torch.ones(cout, cin, kernel, kernel)
        c = kernel // 2
        mask[:, :, c, c + (1 if include_center else 0):] = 0
        mask[:, :, c + 1:] = 0
        self.register_buffer("mask", mask, persistent=False)  # derived, not part of the checkpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class PixelContext(nn.Module):
    """params (B, P, H, W) of the base likelihood and the image x (B, C, H, W, on [-1, 1]) ->
    adjusted params (B, P, H, W); output at pixel (i, j) depends on x only at earlier pixels."""

    def __init__(self, channels: int, num_params: int, width: int, layers: int) -> None:
        super().__init__()
        self.first = MaskedConv2d(channels, width, FIRST_KERNEL, include_center=False)
        self.cond = nn.Conv2d(num_params, width, 1)
        self.blocks = nn.ModuleList(MaskedConv2d(width, width, 3, include_center=True) for _ in range(layers))
        self.out = nn.Conv2d(width, num_params, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @property
    def radius(self) -> int:
        """How far (in pixels, up and sideways) one output depends on the input."""
        return FIRST_KERNEL // 2 + len(self.blocks)

    def forward(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x) + self.cond(params)
        for block in self.blocks:
            h = h + block(F.silu(h))
        return params + self.out(F.silu(h))

    def window(self, params: torch.Tensor, x: torch.Tensor, i: int, j: int) -> torch.Tensor:
        """The adjusted params at pixel (i, j) alone: (B, P, 1, 1). Exact: the window covers the
        receptive field, and its cut edges (unlike the image's own edges) lie farther from (i, j)
        than errors from the missing outside pixels travel through the layers."""
        r = self.radius
        top, left, right = max(0, i - r), max(0, j - r), min(x.shape[-1], j + r + 1)
        out = self(params[:, :, top:i + 1, left:right], x[:, :, top:i + 1, left:right])
        return out[:, :, i - top:i - top + 1, j - left:j - left + 1]


class ContextPixels:
    """The pixel likelihood with a :class:`PixelContext`: the same interface as the factorised
    likelihoods of :mod:`vae_model.distributions` (``nll``, ``mean_image``, ``sample_image``)."""

    def __init__(self, name: str, params: torch.Tensor, channels: int, mixtures: int, context: PixelContext,
                 precise: bool = False) -> None:
        self.name, self.params, self.channels, self.mixtures = name, params, channels, mixtures
        self.context, self.precise = context, precise

    def _base(self, params: torch.Tensor):
        return pixel_distribution(self.name, params.double() if self.precise else params, self.channels, self.mixtures)

    def nll(self, target: torch.Tensor) -> torch.Tensor:
        """-log p(target|z) in nats per sample; target holds pixel values 0..255 as floats."""
        x = (target.to(self.params.dtype) / 127.5 - 1.0)
        return self._base(self.context(self.params, x)).nll(target)

    def _raster(self, draw) -> torch.Tensor:
        b, _, h, w = self.params.shape
        x = torch.zeros((b, self.channels, h, w), dtype=self.params.dtype, device=self.params.device)
        for i in range(h):
            for j in range(w):
                pixel = draw(self._base(self.context.window(self.params, x, i, j)))  # (B, C, 1, 1), 0..255
                x[:, :, i, j] = pixel[:, :, 0, 0].to(x.dtype) / 127.5 - 1.0
        return (x + 1.0) * 127.5

    def mean_image(self) -> torch.Tensor:
        """Greedy decoding in raster order: each pixel is its conditional mean given the pixels
        decoded before it, rounded to its 8-bit value (what the next pixels see). [0, 255]."""
        return self._raster(lambda d: d.mean_image().round())

    def sample_image(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Ancestral sampling in raster order, one pixel (all channels) at a time."""
        return self._raster(lambda d: d.sample_image(generator))
