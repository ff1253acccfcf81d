"""Tail probabilities of anomaly statistics under a reference, and rules that combine them.

Each statistic s (the -ELBO, the complexity, a density, ...) gets a :class:`TailCDF`: its
distribution over normal validation images, stored compressed (the values at a fixed grid of
quantiles between ``TAIL_MASS`` and ``1 - TAIL_MASS``) with an exponential tail beyond each end
(the maximum-likelihood exponential of the exceedances past the end knot: a generalized Pareto
tail of shape 0). Its tail probability of a new value is then defined everywhere, continuous and
monotone, and computed as a logarithm, so that an image thousands of nats out is still ranked
(a plain empirical p-value stops at 1 / n, where every clear anomaly ties).

``side`` says which departures count: ``upper`` (only large values are anomalous: a distance
or a -log density) or ``two`` (both: an image can be too likely as well as too unlikely, the
failure of plain likelihoods on simple images, Nalisnick et al. 2019); a two-sided p is twice
the smaller tail, capped at 1.

:func:`combine` turns the statistics' log p-values into one statistic, higher = more anomalous:
  ``fisher``  -2 sum_i log p_i (Fisher's method): strongest when several statistics move a little.
  ``tpm``     sum_i max(0, log TPM_TAU - log p_i): the truncated product of Zaykin et al. 2002 in a
              continuous form; only p-values below TPM_TAU count, so a statistic that an anomaly
              moves the *other* way (MNIST digits are more likely than clothes: their -ELBO p-value
              is ~1) costs it nothing, where Fisher's sum would pull it below the normal images.
  ``minp``    -log min_i p_i (the minimum p-value; Tippett / Sidak): strongest when one moves alone.
  ``hmp``     log sum_i 1 / p_i (the harmonic mean p-value of Wilson 2019, as -log of it up to the
              constant log K): a soft minimum p-value. One tiny p decides it as in ``minp``, several
              small ones add up (less than in Fisher's sum), and a p near 1 adds 1 where a normal
              image's adds 1/U (median 2, unbounded): a statistic an anomaly moves the other way
              costs it little. Robust to dependence between the statistics (Wilson's point).
The four are monotone in every p_i (Fisher and hmp strictly). Their nominal null distributions (chi-square with 2K degrees of
freedom; Sidak's 1 - (1 - p)^K) assume independent statistics, which these are not (the ELBO and
the complexity share a term), so the combined statistic is calibrated empirically instead: a
second :class:`TailCDF` fitted on images that fitted nothing else gives its p-value.

A fifth rule, ``copula``, is not a function of one-sided p-values but of where each statistic
falls in its reference distribution, both ways and jointly (:class:`Copula`, in the spirit of
DoSE, Morningstar et al. 2021): each statistic becomes its logistic score t = log F(s) - log(1 -
F(s)) under its :class:`TailCDF` (0 at the reference median, |t| ~ -log p in either tail), and the
combined statistic is the Mahalanobis distance of the standardised scores under their correlation
over the reference images. It flags an image whose statistics are each ordinary but whose
combination is not (the -ELBO and the coder length move together on normal images), and one that
a statistic finds too *typical* (a digit too likely for a clothing model); it is not monotone in
each statistic, by design.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TAIL_MASS = 0.05  # beyond these quantiles, the exponential tails
N_KNOTS = 129  # stored quantiles of each statistic, evenly spaced in [TAIL_MASS, 1 - TAIL_MASS]
SIDES = ("upper", "two")
P_RULES = ("fisher", "tpm", "minp", "hmp")  # the rules of p-values (:func:`combine`)
RULES = P_RULES + ("copula",)
COPULA_RIDGE = 1e-3  # added to the correlation's diagonal: a near-duplicate statistic stays invertible
DEFAULT_RULE = "fisher"  # the typicality score's (issue 14: chosen on the battery's development half)
TPM_TAU = 0.1  # the truncated product's threshold
MIN_REFERENCE = 8  # calibration refuses fewer images before this (jobs.calibrate.MIN_IMAGES); more is better


@dataclass
class TailCDF:
    """A statistic's reference distribution: quantile knots plus exponential tails.

    ``knots`` are the reference values at ``probs`` (evenly spaced CDF values from ``TAIL_MASS``
    to ``1 - TAIL_MASS``); below the first knot F(x) = TAIL_MASS * exp(-(knots[0] - x) / lo_scale),
    above the last 1 - F(x) = TAIL_MASS * exp(-(x - knots[-1]) / hi_scale)."""

    knots: np.ndarray  # (m,) strictly increasing
    lo_scale: float
    hi_scale: float
    side: str = "upper"

    @property
    def probs(self) -> np.ndarray:
        return np.linspace(TAIL_MASS, 1 - TAIL_MASS, len(self.knots))

    @classmethod
    def fit(cls, values: np.ndarray, side: str = "upper", n_knots: int = N_KNOTS) -> "TailCDF":
        x = np.sort(np.asarray(values, dtype=np.float64))
        if side not in SIDES:
            raise ValueError(f"side {side!r}: choose one of {', '.join(SIDES)}")
        if len(x) < MIN_REFERENCE or not np.isfinite(x).all():
            raise ValueError(f"a tail model needs at least {MIN_REFERENCE} finite reference values, got {len(x)}")
        knots = np.quantile(x, np.linspace(TAIL_MASS, 1 - TAIL_MASS, n_knots))
        spread = max(float(knots[-1] - knots[0]), float(np.std(x)), 1e-12)
        # Ties (a discrete statistic) would make the curve a step: np.interp needs increasing knots.
        knots = np.maximum.accumulate(knots + np.arange(n_knots) * 1e-9 * spread)
        lo = knots[0] - x[x < knots[0]]
        hi = x[x > knots[-1]] - knots[-1]
        floor = 1e-6 * spread  # a tail with no spread would make every value past it infinitely rare
        return cls(knots, max(float(lo.mean()) if len(lo) else floor, floor),
                   max(float(hi.mean()) if len(hi) else floor, floor), side)

    def log_cdf(self, x: np.ndarray) -> np.ndarray:
        """log P(S <= x) under the reference."""
        return self._log_tail(np.asarray(x, dtype=np.float64), lower=True)

    def log_sf(self, x: np.ndarray) -> np.ndarray:
        """log P(S >= x) under the reference."""
        return self._log_tail(np.asarray(x, dtype=np.float64), lower=False)

    def _log_tail(self, x: np.ndarray, lower: bool) -> np.ndarray:
        k, probs = self.knots, self.probs
        mid = np.interp(x, k, probs)  # CDF in the bulk
        out = np.log(mid if lower else 1.0 - mid)
        if lower:
            below, above = x < k[0], x > k[-1]
            out[below] = math.log(TAIL_MASS) - (k[0] - x[below]) / self.lo_scale
            out[above] = np.log1p(-TAIL_MASS * np.exp(-(x[above] - k[-1]) / self.hi_scale))
        else:
            below, above = x < k[0], x > k[-1]
            out[above] = math.log(TAIL_MASS) - (x[above] - k[-1]) / self.hi_scale
            out[below] = np.log1p(-TAIL_MASS * np.exp(-(k[0] - x[below]) / self.lo_scale))
        return out

    def log_p(self, x: np.ndarray, side: str | None = None) -> np.ndarray:
        """log of the tail probability that counts as anomalous (``side``, default the fitted
        one: both tails are fitted whatever it is); <= 0, never -inf for finite x,
        non-increasing in x for ``upper``."""
        side = side or self.side
        if side not in SIDES:
            raise ValueError(f"side {side!r}: choose one of {', '.join(SIDES)}")
        if side == "upper":
            return self.log_sf(x)
        return np.minimum(math.log(2.0) + np.minimum(self.log_cdf(x), self.log_sf(x)), 0.0)

    def to_dict(self) -> dict:
        return {"side": self.side, "knots": [float(f"{v:.10g}") for v in self.knots],
                "lo_scale": self.lo_scale, "hi_scale": self.hi_scale}

    @classmethod
    def from_dict(cls, d: dict) -> "TailCDF":
        """Assumes a checked dict (vae_model.typicality checks shapes and finiteness)."""
        knots = np.maximum.accumulate(np.asarray(d["knots"], dtype=np.float64))
        return cls(knots, float(d["lo_scale"]), float(d["hi_scale"]), str(d["side"]))


def combine(log_ps: np.ndarray, rule: str = "fisher") -> np.ndarray:
    """One statistic from K log p-values per image (B, K), higher = more anomalous (see the
    module docstring); monotone non-increasing in each p."""
    lp = np.asarray(log_ps, dtype=np.float64)
    if rule == "fisher":
        return -2.0 * lp.sum(1)
    if rule == "tpm":
        return np.maximum(math.log(TPM_TAU) - lp, 0.0).sum(1)
    if rule == "minp":
        return -lp.min(1)
    if rule == "hmp":  # log sum exp(-log p), finite for any finite log p
        return np.logaddexp.reduce(-lp, axis=1)
    if rule == "copula":
        raise ValueError("the copula rule combines statistics, not p-values: use Copula.statistic")
    raise ValueError(f"combination rule {rule!r}: choose one of {', '.join(RULES)}")


def logistic_score(tail: TailCDF, x: np.ndarray) -> np.ndarray:
    """log F(x) - log(1 - F(x)) under ``tail``'s reference: 0 at its median, increasing, finite."""
    return tail.log_cdf(x) - tail.log_sf(x)


@dataclass
class Copula:
    """The joint reference of K statistics' logistic scores (the ``copula`` rule: module
    docstring): their means and standard deviations over the reference images and the correlation
    of the standardised scores. :meth:`statistic` works on any subset of the K columns."""

    mean: np.ndarray  # (K,)
    std: np.ndarray  # (K,) > 0
    corr: np.ndarray  # (K, K)

    @classmethod
    def fit(cls, t: np.ndarray) -> "Copula":
        t = np.asarray(t, dtype=np.float64)
        if t.ndim != 2 or len(t) < MIN_REFERENCE or not np.isfinite(t).all():
            raise ValueError(f"a copula needs at least {MIN_REFERENCE} rows of finite scores, got {t.shape}")
        mean, std = t.mean(0), np.maximum(t.std(0), 1e-9)
        z = (t - mean) / std
        corr = (z.T @ z) / len(z)
        return cls(mean, std, corr)

    def statistic(self, t: np.ndarray, cols: list[int] | None = None) -> np.ndarray:
        """Mahalanobis distance^2 of logistic scores ``t`` (B, len(cols)) for columns ``cols``
        (default all) of the fitted ones; higher = less like the reference."""
        cols = list(range(len(self.mean))) if cols is None else list(cols)
        z = (np.asarray(t, dtype=np.float64) - self.mean[cols]) / self.std[cols]
        c = self.corr[np.ix_(cols, cols)]
        prec = np.linalg.inv(c + COPULA_RIDGE * np.eye(len(cols)))
        return np.einsum("bi,ij,bj->b", z, prec, z)

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "corr": self.corr.tolist()}
