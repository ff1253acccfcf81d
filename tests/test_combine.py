"""vae_model.combine: tail probabilities under a reference and the rules that combine them."""
import numpy as np
import pytest

from vae_model.combine import RULES, TAIL_MASS, TPM_TAU, TailCDF, combine


def test_tail_probability_matches_the_reference_distribution():
    rng = np.random.default_rng(0)
    tail = TailCDF.fit(rng.normal(size=20_000))
    x = rng.normal(size=20_000)
    p = np.exp(tail.log_sf(x))
    # Uniform under the reference: its deciles where they should be (bulk and tails).
    np.testing.assert_allclose(np.quantile(p, np.linspace(0.1, 0.9, 9)), np.linspace(0.1, 0.9, 9), atol=0.01)
    assert abs((p < 0.01).mean() - 0.01) < 0.003
    # Continuous at the end knots, non-increasing everywhere, finite far out.
    grid = np.linspace(-50, 50, 20_001)
    lp = tail.log_sf(grid)
    assert (np.diff(lp) <= 1e-12).all() and np.isfinite(lp).all() and lp[-1] < -100
    edge = tail.knots[-1]
    np.testing.assert_allclose(tail.log_sf(np.array([edge - 1e-9, edge + 1e-9])), np.log(TAIL_MASS), atol=1e-6)


def test_two_sided_counts_both_tails():
    rng = np.random.default_rng(1)
    tail = TailCDF.fit(rng.normal(size=5000), side="two")
    lp = tail.log_p(np.array([-4.0, 0.0, 4.0]))
    assert lp[0] < np.log(0.01) and lp[2] < np.log(0.01) and lp[1] == pytest.approx(0.0, abs=0.05)
    p = np.exp(tail.log_p(rng.normal(size=20_000)))
    assert abs((p < 0.05).mean() - 0.05) < 0.01


def _reference_logp(rng, n, k=3, corr=0.6):
    """log p-values of K correlated statistics under their own reference."""
    cov = np.full((k, k), corr) + (1 - corr) * np.eye(k)
    ref, new = rng.multivariate_normal(np.zeros(k), cov, n), rng.multivariate_normal(np.zeros(k), cov, n)
    tails = [TailCDF.fit(ref[:, i]) for i in range(k)]
    return tails, np.stack([t.log_p(new[:, i]) for i, t in enumerate(tails)], 1), cov


@pytest.mark.parametrize("rule", RULES)
def test_combined_statistic_is_monotone_in_each_p_value(rule):
    rng = np.random.default_rng(2)
    lp = np.log(rng.uniform(size=(500, 4)))
    base = combine(lp, rule)
    for i in range(4):
        smaller = lp.copy()
        smaller[:, i] -= rng.exponential(size=500)  # a smaller p-value in statistic i only
        assert (combine(smaller, rule) >= base - 1e-12).all()
    if rule == "fisher":  # strictly
        assert (combine(lp - 0.1 * np.eye(4)[0], rule) > base).all()
    if rule == "tpm":  # a p-value above the threshold counts for nothing: "too normal" does not lower it
        high = lp.copy()
        high[:, 0] = 0.0
        above = lp[:, 0] > np.log(TPM_TAU)
        np.testing.assert_array_equal(combine(high, rule)[above], base[above])


@pytest.mark.parametrize("rule", RULES)
def test_calibrated_combination_is_uniform_on_reference_data(rule):
    """Combined p-values of new reference-distributed images are ~uniform once the combined
    statistic is calibrated on other reference images (the statistics are correlated, so the
    nominal chi-square would not be)."""
    rng = np.random.default_rng(3)
    tails, lp_cal, cov = _reference_logp(rng, 4000)
    final = TailCDF.fit(combine(lp_cal, rule))
    new = rng.multivariate_normal(np.zeros(3), cov, 20_000)
    lp = np.stack([t.log_p(new[:, i]) for i, t in enumerate(tails)], 1)
    p = np.exp(final.log_sf(combine(lp, rule)))
    # tpm: an atom at 0 (every p above the threshold), so uniform only past it (its upper ~30%)
    for q in (0.01, 0.05, 0.1) + ((0.5,) if rule != "tpm" else ()):  # within 4 sd of 4,000 images' error
        assert abs((p < q).mean() - q) < 4 * np.sqrt(q * (1 - q) / 4000) + 0.002, (q, (p < q).mean())


@pytest.mark.parametrize("rule", RULES)
def test_one_statistic_alone_separating_still_separates_combined(rule):
    rng = np.random.default_rng(4)
    tails, lp_normal, cov = _reference_logp(rng, 3000)
    shifted = rng.multivariate_normal(np.zeros(3), cov, 3000)
    shifted[:, 1] += 6.0  # only statistic 1 moves
    lp_anom = np.stack([t.log_p(shifted[:, i]) for i, t in enumerate(tails)], 1)
    normal, anom = combine(lp_normal, rule), combine(lp_anom, rule)
    auroc = (anom[:, None] > normal[None]).mean()
    alone = (-lp_anom[:, 1][:, None] > -lp_normal[:, 1][None]).mean()
    assert auroc > 0.99 and auroc > alone - 0.01, (auroc, alone)
    # And far-out anomalies keep their order instead of tying at 1 / n.
    far = tails[1].log_p(np.array([10.0, 20.0, 40.0]))
    assert far[0] > far[1] > far[2] and np.isfinite(far).all()
