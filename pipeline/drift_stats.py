"""The statistical tests behind a partition's drift verdicts, in numpy (no scipy).

Each function returns plain floats. Tail probabilities come from the regularised incomplete
beta function (continued fraction, Numerical Recipes 6.4) and the Kolmogorov distribution's
series; tests/test_drift_stats.py checks them against known values and simulated nulls.
"""
from __future__ import annotations

import math

import numpy as np


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):  # the continued fraction converges fast on this side
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def _betacf(a: float, b: float, x: float, tiny: float = 1e-300, eps: float = 1e-15) -> float:
    """Lentz's evaluation of the continued fraction of I_x(a, b)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def f_sf(f: float, d1: float, d2: float) -> float:
    """P(F > f) for an F(d1, d2) variable."""
    if f <= 0:
        return 1.0
    return betainc(d2 / 2.0, d1 / 2.0, d2 / (d2 + d1 * f))


def binomial_test(k: int, n: int, p: float) -> float:
    """Two-sided binomial test of ``k`` successes in ``n`` trials at rate ``p`` (twice the smaller
    tail, at most 1). P(K <= k) = I_{1-p}(n - k, k + 1)."""
    if n == 0:
        return 1.0
    lower = 1.0 if k >= n else betainc(n - k, k + 1, 1.0 - p)
    upper = 1.0 if k <= 0 else betainc(k, n - k + 1, p)  # P(K >= k)
    return min(1.0, 2.0 * min(lower, upper))


def beta_binomial_test(k: int, n: int, alpha: float, beta: float) -> float:
    """Two-sided test of ``k`` successes in ``n`` trials whose rate is itself Beta(alpha, beta):
    the binomial test when the expected rate carries sampling error (twice the smaller tail)."""
    if n == 0:
        return 1.0
    j = np.arange(n, dtype=np.float64)  # pmf(j+1) / pmf(j) = (n-j)(j+alpha) / ((j+1)(n-j-1+beta))
    log_ratio = np.log(n - j) + np.log(j + alpha) - np.log(j + 1) - np.log(n - j - 1 + beta)
    log0 = math.lgamma(n + beta) + math.lgamma(alpha + beta) - math.lgamma(n + alpha + beta) - math.lgamma(beta)
    log_pmf = np.concatenate([[log0], log0 + np.cumsum(log_ratio)])
    pmf = np.exp(log_pmf - log_pmf.max())
    pmf /= pmf.sum()
    lower, upper = float(pmf[:k + 1].sum()), float(pmf[k:].sum())
    return min(1.0, 2.0 * min(lower, upper))


def kolmogorov_sf(lam: float) -> float:
    """P(K > lam) for the Kolmogorov distribution: 2 sum_j (-1)^(j-1) exp(-2 j^2 lam^2)."""
    if lam < 0.2:  # the series needs many terms here, and the value is 1 to 15 digits
        return 1.0
    total = 0.0
    for j in range(1, 101):
        term = math.exp(-2.0 * j * j * lam * lam)
        total += term if j % 2 else -term
        if term < 1e-16:
            break
    return min(1.0, max(0.0, 2.0 * total))


def ks_p_value(d: float, n_eff: float) -> float:
    """Asymptotic p-value of a KS distance ``d`` on ``n_eff`` points (n1 n2 / (n1 + n2) for two
    samples), with Stephens' small-sample correction (Numerical Recipes 14.3)."""
    if n_eff <= 0:
        return 1.0
    root = math.sqrt(n_eff)
    return kolmogorov_sf((root + 0.12 + 0.11 / root) * d)


def ks_two_sample(a: np.ndarray, b: np.ndarray) -> float:
    """The two-sample Kolmogorov-Smirnov distance sup |F_a - F_b|, exact."""
    a, b = np.sort(np.asarray(a, np.float64)), np.sort(np.asarray(b, np.float64))
    grid = np.concatenate([a, b])
    fa = np.searchsorted(a, grid, side="right") / len(a)
    fb = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.max(np.abs(fa - fb)))


def psi(observed: np.ndarray, expected: np.ndarray, n_observed: int, n_expected: int | None = None) -> float:
    """Population stability index sum (o - e) ln(o / e) over bins of proportions. Empty bins count
    half an observation (of their own sample) so that the index stays finite."""
    o = np.maximum(np.asarray(observed, np.float64), 0.5 / max(n_observed, 1))
    e = np.maximum(np.asarray(expected, np.float64), 0.5 / max(n_expected or n_observed, 1))
    o, e = o / o.sum(), e / e.sum()
    return float(np.sum((o - e) * np.log(o / e)))


def hotelling_two_sample(mean1: np.ndarray, cov1: np.ndarray, n1: int, mean2: np.ndarray, cov2: np.ndarray,
                         n2: int) -> tuple[float, float]:
    """Two-sample Hotelling T^2 test of equal means from each sample's mean and (unbiased)
    covariance, with the pooled covariance: ``(T^2, p)``; T^2 (n1 + n2 - d - 1) / (d (n1 + n2 - 2))
    is F(d, n1 + n2 - d - 1) under the null."""
    d = len(mean1)
    dof = n1 + n2 - d - 1
    if n1 < 2 or n2 < 2 or dof < 1:
        return math.nan, math.nan
    pooled = ((n1 - 1) * np.asarray(cov1) + (n2 - 1) * np.asarray(cov2)) / (n1 + n2 - 2)
    delta = np.asarray(mean1, np.float64) - np.asarray(mean2, np.float64)
    t2 = float(n1 * n2 / (n1 + n2) * delta @ np.linalg.pinv(pooled, hermitian=True) @ delta)
    return t2, f_sf(t2 * dof / (d * (n1 + n2 - 2)), d, dof)


def gaussian_kl(mean1: np.ndarray, cov1: np.ndarray, mean0: np.ndarray, cov0: np.ndarray) -> float:
    """KL(N(mean1, cov1) || N(mean0, cov0)) in nats."""
    d = len(mean0)
    inv0 = np.linalg.pinv(cov0, hermitian=True)
    delta = np.asarray(mean1, np.float64) - np.asarray(mean0, np.float64)
    _, logdet0 = np.linalg.slogdet(cov0)
    _, logdet1 = np.linalg.slogdet(cov1)
    return float(0.5 * (np.trace(inv0 @ cov1) + delta @ inv0 @ delta - d + logdet0 - logdet1))


def mahalanobis(mean1: np.ndarray, mean0: np.ndarray, cov0: np.ndarray) -> float:
    """Distance of ``mean1`` from ``mean0`` in units of ``cov0`` (multivariate Cohen's d)."""
    delta = np.asarray(mean1, np.float64) - np.asarray(mean0, np.float64)
    return float(math.sqrt(max(delta @ np.linalg.pinv(cov0, hermitian=True) @ delta, 0.0)))
