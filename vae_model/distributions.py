"""Distributions: the diagonal Gaussian posterior and the pixel likelihoods p(x|z).

All ``log_prob``/``kl``/``nll`` methods return one value per sample (summed over the
non-batch dimensions), so they serve training (mean over the batch) and scoring alike.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)


class DiagonalGaussian:
    """q(z|x) = N(mean, diag exp(logvar)); the object ``VAE.encode`` returns.

    Args:
        mean: (B, D) posterior means.
        logvar: (B, D) log variances (clamped to [logvar_min, logvar_max] for stability).
    """

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor,
                 logvar_min: float = -30.0, logvar_max: float = 20.0) -> None:
        self.mean = mean
        self.logvar = logvar.clamp(logvar_min, logvar_max)
        self.std = torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None, n: int | None = None,
               eps: torch.Tensor | None = None) -> torch.Tensor:
        """Reparameterised sample(s): (B, D), or (n, B, D) when ``n`` is given.

        ``eps`` (standard normal noise of that shape) may be passed in to make samples
        independent of batch composition (the pipeline seeds noise per image key).
        """
        shape = self.mean.shape if n is None else (n, *self.mean.shape)
        if eps is None:
            eps = torch.randn(shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log q(z|x) summed over latent dims; z is (..., B, D) -> (..., B)."""
        return (-0.5 * (LOG_2PI + self.logvar + (z - self.mean) ** 2 / self.logvar.exp())).sum(-1)

    def kl(self) -> torch.Tensor:
        """Analytic KL(q || N(0, I)) per sample: (B,). Kingma & Welling 2014, appendix B."""
        return 0.5 * (self.mean ** 2 + self.logvar.exp() - 1.0 - self.logvar).sum(-1)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over the last dim."""
    return (-0.5 * (LOG_2PI + z ** 2)).sum(-1)


def _flat_sum(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).sum(-1)


class BernoulliPixels:
    """p(x|z) for binary images: one logit per pixel (x in {0, 1})."""

    params_per_channel = 1

    def __init__(self, params: torch.Tensor) -> None:
        self.logits = params  # (B, C, H, W)

    def nll(self, target: torch.Tensor) -> torch.Tensor:
        """-log p(target|z) in nats per sample; target is float {0,1} (B, C, H, W)."""
        return _flat_sum(F.binary_cross_entropy_with_logits(self.logits, target, reduction="none"))

    def mean_image(self) -> torch.Tensor:
        """Pixel probabilities scaled to [0, 255] (B, C, H, W), as floats."""
        return torch.sigmoid(self.logits) * 255.0

    def sample_image(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.bernoulli(torch.sigmoid(self.logits), generator=generator) * 255.0


class DiscretizedLogisticPixels:
    """p(x|z) for 8-bit images: a logistic per pixel, discretised into 256 bins.

    Salimans et al. 2017 (PixelCNN++), one component. Pixel values v in {0..255} are mapped to
    x = 2v/255 - 1; bin v covers [x - 1/255, x + 1/255], with the edge bins extended to
    -inf / +inf, so the probabilities of the 256 values sum to exactly 1.
    """

    params_per_channel = 2
    log_scale_min = -7.0

    def __init__(self, params: torch.Tensor) -> None:
        loc, log_scale = params.chunk(2, dim=1)  # each (B, C, H, W)
        self.loc = loc
        self.log_scale = log_scale.clamp(min=self.log_scale_min)

    def log_prob_values(self, values: torch.Tensor) -> torch.Tensor:
        """Per-pixel log p(v) for integer-valued float ``values`` in [0, 255] (B, C, H, W)."""
        x = values / 127.5 - 1.0
        centered = x - self.loc
        inv_s = torch.exp(-self.log_scale)
        plus = inv_s * (centered + 1.0 / 255.0)
        minus = inv_s * (centered - 1.0 / 255.0)
        cdf_plus, cdf_minus = torch.sigmoid(plus), torch.sigmoid(minus)
        log_cdf_plus = plus - F.softplus(plus)  # log sigmoid(plus), for v = 0
        log_one_minus_cdf_minus = -F.softplus(minus)  # log(1 - sigmoid(minus)), for v = 255
        cdf_delta = cdf_plus - cdf_minus
        # When the bin mass underflows, use the density at the centre times the bin width.
        mid = inv_s * centered
        log_pdf_mid = mid - self.log_scale - 2.0 * F.softplus(mid)
        log_mid = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)),
                              log_pdf_mid - math.log(127.5))
        return torch.where(values < 0.5, log_cdf_plus,
                           torch.where(values > 254.5, log_one_minus_cdf_minus, log_mid))

    def nll(self, target: torch.Tensor) -> torch.Tensor:
        """-log p(target|z) in nats per sample; target holds pixel values 0..255 as floats."""
        return -_flat_sum(self.log_prob_values(target))

    def mean_image(self) -> torch.Tensor:
        return ((self.loc.clamp(-1, 1) + 1.0) * 127.5)

    def sample_image(self, generator: torch.Generator | None = None) -> torch.Tensor:
        u = torch.rand(self.loc.shape, generator=generator, device=self.loc.device).clamp(1e-5, 1 - 1e-5)
        x = self.loc + self.log_scale.exp() * (torch.log(u) - torch.log1p(-u))
        return ((x.clamp(-1, 1) + 1.0) * 127.5).round()


PIXEL_LIKELIHOODS = {"bernoulli": BernoulliPixels, "discretized_logistic": DiscretizedLogisticPixels}
