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
        return self.kl_per_dim().sum(-1)

    def kl_per_dim(self) -> torch.Tensor:
        """The KL of each latent dimension: (B, D)."""
        return 0.5 * (self.mean ** 2 + self.logvar.exp() - 1.0 - self.logvar)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over the last dim."""
    return (-0.5 * (LOG_2PI + z ** 2)).sum(-1)


def _flat_sum(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).sum(-1)


class BernoulliPixels:
    """p(x|z) for binary images: one logit per pixel (x in {0, 1})."""

    params_per_channel = 1

    def __init__(self, params: torch.Tensor, channels: int | None = None, mixtures: int = 1) -> None:
        self.logits = params  # (B, C, H, W); channels and mixtures: the common signature (pixel_distribution)

    @classmethod
    def num_params(cls, channels: int, mixtures: int = 1) -> int:
        return channels

    def nll(self, target: torch.Tensor) -> torch.Tensor:
        """-log p(target|z) in nats per sample; target is float {0,1} (B, C, H, W)."""
        return _flat_sum(F.binary_cross_entropy_with_logits(self.logits, target, reduction="none"))

    def mean_image(self) -> torch.Tensor:
        """Pixel probabilities scaled to [0, 255] (B, C, H, W), as floats."""
        return torch.sigmoid(self.logits) * 255.0

    def sample_image(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.bernoulli(torch.sigmoid(self.logits), generator=generator) * 255.0


def discretized_logistic_log_prob(values: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Elementwise log P(v) of 8-bit values under a logistic discretised into 256 bins.

    ``values`` hold integers 0..255 as floats; ``loc`` is on the [-1, 1] scale (v -> 2v/255 - 1);
    bin v covers [x - 1/255, x + 1/255], the edge bins extended to -inf / +inf (Salimans et al.
    2017), so the 256 probabilities sum to exactly 1. Broadcasts ``values`` against ``loc``."""
    x = values / 127.5 - 1.0
    centered = x - loc
    inv_s = torch.exp(-log_scale)
    plus = inv_s * (centered + 1.0 / 255.0)
    minus = inv_s * (centered - 1.0 / 255.0)
    cdf_delta = torch.sigmoid(plus) - torch.sigmoid(minus)
    log_cdf_plus = plus - F.softplus(plus)  # log sigmoid(plus), for v = 0
    log_one_minus_cdf_minus = -F.softplus(minus)  # log(1 - sigmoid(minus)), for v = 255
    # When the bin mass underflows, use the density at the centre times the bin width.
    mid = inv_s * centered
    log_pdf_mid = mid - log_scale - 2.0 * F.softplus(mid)
    log_mid = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)), log_pdf_mid - math.log(127.5))
    return torch.where(values < 0.5, log_cdf_plus, torch.where(values > 254.5, log_one_minus_cdf_minus, log_mid))


class DiscretizedLogisticPixels:
    """p(x|z) for 8-bit images: a logistic per pixel, discretised into 256 bins.

    Salimans et al. 2017 (PixelCNN++), one component. Pixel values v in {0..255} are mapped to
    x = 2v/255 - 1; bin v covers [x - 1/255, x + 1/255], with the edge bins extended to
    -inf / +inf, so the probabilities of the 256 values sum to exactly 1.
    """

    params_per_channel = 2
    log_scale_min = -7.0

    def __init__(self, params: torch.Tensor, channels: int | None = None, mixtures: int = 1) -> None:
        loc, log_scale = params.chunk(2, dim=1)  # each (B, C, H, W)
        self.loc = loc
        self.log_scale = log_scale.clamp(min=self.log_scale_min)

    @classmethod
    def num_params(cls, channels: int, mixtures: int = 1) -> int:
        return channels * cls.params_per_channel

    def log_prob_values(self, values: torch.Tensor) -> torch.Tensor:
        """Per-pixel log p(v) for integer-valued float ``values`` in [0, 255] (B, C, H, W)."""
        return discretized_logistic_log_prob(values, self.loc, self.log_scale)

    def nll(self, target: torch.Tensor) -> torch.Tensor:
        """-log p(target|z) in nats per sample; target holds pixel values 0..255 as floats."""
        return -_flat_sum(self.log_prob_values(target))

    def mean_image(self) -> torch.Tensor:
        return ((self.loc.clamp(-1, 1) + 1.0) * 127.5)

    def sample_image(self, generator: torch.Generator | None = None) -> torch.Tensor:
        u = torch.rand(self.loc.shape, generator=generator, device=self.loc.device).clamp(1e-5, 1 - 1e-5)
        x = self.loc + self.log_scale.exp() * (torch.log(u) - torch.log1p(-u))
        return ((x.clamp(-1, 1) + 1.0) * 127.5).round()


class LogisticMixturePixels:
    """p(x|z) for 8-bit images: a mixture of discretised logistics per pixel, with the colour
    channels coupled (PixelCNN++, Salimans et al. 2017, section 2.2).

    Each pixel has ``K`` components. Component k has a weight, a location and log-scale per
    channel and, for RGB, three coefficients that make the channels autoregressive within the
    pixel: ``mu_G = m_G + a x_R``, ``mu_B = m_B + b x_R + c x_G`` (``a, b, c = tanh(.)``). So
    p(x_R, x_G, x_B | z) = sum_k pi_k p(x_R) p(x_G | x_R) p(x_B | x_R, x_G), an exact, normalised
    likelihood: colour errors that a blurry decoder makes in all three channels at once are paid
    for once. Pixels stay independent of each other given z (no spatial autoregression), so
    encoding, scoring and sampling cost one decoder pass.

    Parameter layout along dim 1, for C channels: K logits, then K*C locations, K*C log-scales,
    then (C = 3 only) 3K coefficients.
    """

    log_scale_min = -7.0
    chunk_values = 1 << 20  # nll: at most this many (B, K, C, rows, W) terms at once

    def __init__(self, params: torch.Tensor, channels: int, mixtures: int) -> None:
        b, _, h, w = params.shape
        k, c = mixtures, channels
        self.params = params
        self.channels, self.mixtures = c, k
        self.logits = params[:, :k]  # (B, K, H, W)
        self.loc = params[:, k:k + k * c].reshape(b, k, c, h, w)
        self.log_scale = params[:, k + k * c:k + 2 * k * c].reshape(b, k, c, h, w).clamp(min=self.log_scale_min)
        self.coeffs = torch.tanh(params[:, k + 2 * k * c:].reshape(b, k, 3, h, w)) if c == 3 else None

    @classmethod
    def num_params(cls, channels: int, mixtures: int = 1) -> int:
        return mixtures * (1 + 2 * channels + (3 if channels == 3 else 0))

    def _coupled_loc(self, x: torch.Tensor) -> torch.Tensor:
        """Locations (B, K, C, H, W) given the image ``x`` on the [-1, 1] scale (B, C, H, W)."""
        if self.coeffs is None:
            return self.loc
        xr, xg = x[:, None, 0], x[:, None, 1]  # (B, 1, H, W)
        a, b, c = self.coeffs.unbind(2)  # each (B, K, H, W)
        m_r, m_g, m_b = self.loc.unbind(2)
        return torch.stack([m_r, m_g + a * xr, m_b + b * xr + c * xg], dim=2)

    def log_prob_pixels(self, values: torch.Tensor) -> torch.Tensor:
        """log p of each pixel (all channels jointly): (B, H, W) for values 0..255 (B, C, H, W)."""
        loc = self._coupled_loc(values / 127.5 - 1.0)
        per_channel = discretized_logistic_log_prob(values[:, None], loc, self.log_scale)  # (B, K, C, H, W)
        return torch.logsumexp(per_channel.sum(2) + F.log_softmax(self.logits, dim=1), dim=1)

    def nll(self, target: torch.Tensor) -> torch.Tensor:
        """-log p(target|z) in nats per sample; target holds pixel values 0..255 as floats.

        Evaluated in bands of image rows, so that the (B, K, C, rows, W) intermediates (a dozen of
        them, float64 when scoring) stay within ``chunk_values`` terms whatever the image size: at
        64 px, batch 64, the whole image at once held ~0.8 GB. Each image's sum does not depend on
        the batch (the bands are rows of the image, not of the batch)."""
        b, k, c, h, w = self.loc.shape
        rows = max(1, self.chunk_values // max(1, b * k * c * w))
        if rows >= h:
            return -_flat_sum(self.log_prob_pixels(target))
        total = torch.zeros(b, dtype=self.params.dtype, device=self.params.device)
        for r in range(0, h, rows):
            band = LogisticMixturePixels(self.params[:, :, r:r + rows], c, k)
            total = total + _flat_sum(band.log_prob_pixels(target[:, :, r:r + rows]))
        return -total

    def _component_means(self) -> torch.Tensor:
        """Per-component expected image on the [-1, 1] scale, channels in order: (B, K, C, H, W)."""
        if self.coeffs is None:
            return self.loc.clamp(-1, 1)
        a, b, c = self.coeffs.unbind(2)
        m_r, m_g, m_b = self.loc.clamp(-1, 1).unbind(2)
        g = (m_g + a * m_r).clamp(-1, 1)
        return torch.stack([m_r, g, (m_b + b * m_r + c * g).clamp(-1, 1)], dim=2)

    def mean_image(self) -> torch.Tensor:
        """The mixture's mean (each component's channels in turn), scaled to [0, 255]."""
        pi = torch.softmax(self.logits, dim=1)[:, :, None]  # (B, K, 1, H, W)
        return ((pi * self._component_means()).sum(1).clamp(-1, 1) + 1.0) * 127.5

    def sample_image(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One draw per pixel: a component, then the channels in order, each rounded to its bin."""
        b, k, c, h, w = self.loc.shape
        dev = self.loc.device
        u = torch.rand((b, k, h, w), generator=generator, device=dev).clamp(1e-5, 1 - 1e-5)
        pick = (self.logits - torch.log(-torch.log(u))).argmax(1, keepdim=True)  # Gumbel-max: (B, 1, H, W)
        loc = self.loc.gather(1, pick[:, :, None].expand(b, 1, c, h, w))[:, 0]  # (B, C, H, W)
        scale = self.log_scale.gather(1, pick[:, :, None].expand(b, 1, c, h, w))[:, 0].exp()
        coeffs = None if self.coeffs is None else self.coeffs.gather(1, pick[:, :, None].expand(b, 1, 3, h, w))[:, 0]
        out = []
        for ch in range(c):
            mu = loc[:, ch]
            if coeffs is not None and ch == 1:
                mu = mu + coeffs[:, 0] * out[0]
            if coeffs is not None and ch == 2:
                mu = mu + coeffs[:, 1] * out[0] + coeffs[:, 2] * out[1]
            u = torch.rand(mu.shape, generator=generator, device=dev).clamp(1e-5, 1 - 1e-5)
            x = (mu + scale[:, ch] * (torch.log(u) - torch.log1p(-u))).clamp(-1, 1)
            out.append(torch.round((x + 1.0) * 127.5) / 127.5 - 1.0)  # the value, as the next channel sees it
        return ((torch.stack(out, 1) + 1.0) * 127.5).round()


PIXEL_LIKELIHOODS = {"bernoulli": BernoulliPixels, "discretized_logistic": DiscretizedLogisticPixels,
                     "logistic_mixture": LogisticMixturePixels}


def pixel_distribution(name: str, params: torch.Tensor, channels: int, mixtures: int):
    """The pixel likelihood ``name`` over decoder outputs ``params`` (B, num_params, H, W)."""
    return PIXEL_LIKELIHOODS[name](params, channels, mixtures)
