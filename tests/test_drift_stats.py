"""pipeline.drift_stats: the tail probabilities against exact sums and tables, and each test's
p-values on known distributions (uniform under the null, tiny under a shift)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.drift_stats import (beta_binomial_test, betainc, binomial_test, f_sf, gaussian_kl,
                                  hotelling_two_sample, kolmogorov_sf, ks_p_value, ks_two_sample, mahalanobis, psi)


def _binom_cdf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(k + 1))


@pytest.mark.parametrize("a,b,x", [(2, 3, 0.4), (1, 1, 0.3), (5, 9, 0.2), (30, 4, 0.9), (12, 12, 0.5)])
def test_betainc_matches_the_binomial_sum_for_integer_parameters(a, b, x):
    # I_x(a, b) = P(Binomial(a + b - 1, x) >= a) for integers a, b
    assert betainc(a, b, x) == pytest.approx(1 - _binom_cdf(a - 1, a + b - 1, x), rel=1e-10, abs=1e-14)


def test_f_and_kolmogorov_tails_match_the_tables():
    assert f_sf(3.3258, 5, 10) == pytest.approx(0.05, abs=2e-4)  # F(5, 10) 95% point
    assert f_sf(6.6079, 1, 5) == pytest.approx(0.05, abs=2e-4)  # F(1, 5) = t(5)^2: 2.5706^2
    assert kolmogorov_sf(1.3581) == pytest.approx(0.05, abs=2e-4)
    assert kolmogorov_sf(1.6276) == pytest.approx(0.01, abs=1e-4)
    assert kolmogorov_sf(0.1) == 1.0 and kolmogorov_sf(5.0) < 1e-20


def test_binomial_test_is_twice_the_smaller_exact_tail():
    for k, n, p in [(3, 10, 0.5), (0, 50, 0.01), (9, 100, 0.02), (60, 100, 0.5)]:
        lower, upper = _binom_cdf(k, n, p), 1 - _binom_cdf(k - 1, n, p)
        assert binomial_test(k, n, p) == pytest.approx(min(1, 2 * min(lower, upper)), rel=1e-9)


def test_beta_binomial_widens_the_binomial_by_the_rate_uncertainty():
    # a rate known exactly (huge alpha + beta) is the binomial test
    assert beta_binomial_test(9, 100, 2e7, 9.8e8) == pytest.approx(binomial_test(9, 100, 0.02), rel=1e-3)
    # its pmf is the closed form C(n, k) B(k + a, n - k + b) / B(a, b)
    n, a, b, k = 20, 1.5, 30.0, 4
    lbeta = lambda x, y: math.lgamma(x) + math.lgamma(y) - math.lgamma(x + y)  # noqa: E731
    pmf = [math.comb(n, j) * math.exp(lbeta(j + a, n - j + b) - lbeta(a, b)) for j in range(n + 1)]
    assert beta_binomial_test(k, n, a, b) == pytest.approx(min(1, 2 * min(sum(pmf[:k + 1]), sum(pmf[k:]))), rel=1e-9)
    # a rate estimated from few points makes the same count far less surprising
    assert beta_binomial_test(9, 100, 2.0, 98.0) > 50 * binomial_test(9, 100, 0.02)


def test_ks_distance_is_exact_and_its_p_value_uniform_under_the_null():
    a, b = np.array([1.0, 2.0, 3.0]), np.array([2.5, 3.5])
    assert ks_two_sample(a, b) == pytest.approx(2 / 3)  # at x in [2, 2.5): F_a = 2/3, F_b = 0
    rng = np.random.default_rng(0)
    ps = [ks_p_value(ks_two_sample(rng.normal(size=300), rng.normal(size=200)), 300 * 200 / 500)
          for _ in range(400)]
    assert 0.02 < np.mean(np.array(ps) < 0.05) < 0.08
    shifted = ks_two_sample(rng.normal(size=300), rng.normal(0.5, 1, size=300))
    assert ks_p_value(shifted, 150) < 1e-6


def test_psi_known_values():
    assert psi([0.25] * 4, [0.25] * 4, 100) == 0.0
    o, e = np.array([0.4, 0.6]), np.array([0.5, 0.5])
    assert psi(o, e, 1000) == pytest.approx(float(np.sum((o - e) * np.log(o / e))))
    assert math.isfinite(psi([0.0, 1.0], [0.5, 0.5], 100))  # an empty bin counts half an observation


def test_hotelling_p_values_are_uniform_under_the_null_and_tiny_under_a_shift():
    rng = np.random.default_rng(1)
    cov = np.array([[1.0, 0.6, 0.0], [0.6, 2.0, 0.3], [0.0, 0.3, 0.5]])

    def moments(x):
        return x.mean(0), np.cov(x, rowvar=False), len(x)

    ps = [hotelling_two_sample(*moments(rng.multivariate_normal(np.zeros(3), cov, 150)),
                               *moments(rng.multivariate_normal(np.zeros(3), cov, 400)))[1] for _ in range(400)]
    assert 0.02 < np.mean(np.array(ps) < 0.05) < 0.08
    x = rng.multivariate_normal(np.zeros(3), cov, 400)
    y = rng.multivariate_normal([0.3, 0, 0], cov, 400)
    assert hotelling_two_sample(*moments(x), *moments(y))[1] < 1e-4


def test_gaussian_kl_and_mahalanobis_closed_forms():
    # KL(N(1, 4) || N(0, 1)) = (4 + 1 - 1 - ln 4) / 2
    assert gaussian_kl(np.array([1.0]), np.array([[4.0]]), np.array([0.0]), np.array([[1.0]])) == pytest.approx(
        (4 - math.log(4)) / 2)
    assert mahalanobis(np.array([3.0, 0.0]), np.zeros(2), np.diag([9.0, 1.0])) == pytest.approx(1.0)
