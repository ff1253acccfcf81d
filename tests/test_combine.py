"""vae_model.combine: tail probabilities under a reference and the rules that combine them."""
import numpy as np
import pytest

from vae_model.combine import P_RULES, TAIL_MASS, TPM_TAU, Copula, TailCDF, combine, logistic_score


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


@pytest.mark.parametrize("rule", P_RULES)
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
    if rule == "hmp":  # strictly, and a soft minimum: between -log min p and it plus log K
        assert (combine(lp - 0.1 * np.eye(4)[0], rule) > base).all()
        assert (base >= -lp.min(1) - 1e-12).all() and (base <= -lp.min(1) + np.log(4) + 1e-12).all()
    if rule == "tpm":  # a p-value above the threshold counts for nothing: "too normal" does not lower it
        high = lp.copy()
        high[:, 0] = 0.0
        above = lp[:, 0] > np.log(TPM_TAU)
        np.testing.assert_array_equal(combine(high, rule)[above], base[above])


@pytest.mark.parametrize("rule", P_RULES)
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


@pytest.mark.parametrize("rule", P_RULES)
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


def test_the_copula_rule_needs_its_fit():
    with pytest.raises(ValueError, match="copula rule combines statistics"):
        combine(np.zeros((2, 3)), "copula")


def _copula_data(rng, n, corr=0.7):
    cov = np.array([[1.0, corr, 0.0], [corr, 1.0, 0.0], [0.0, 0.0, 1.0]])
    ref = rng.multivariate_normal(np.zeros(3), cov, n)
    tails = [TailCDF.fit(ref[:, i]) for i in range(3)]
    t = lambda x: np.stack([logistic_score(tl, x[:, i]) for i, tl in enumerate(tails)], 1)  # noqa: E731
    return cov, tails, t, Copula.fit(t(ref))


def test_logistic_score_is_centred_increasing_and_finite_far_out():
    rng = np.random.default_rng(5)
    tail = TailCDF.fit(rng.normal(size=5000))
    x = np.linspace(-60, 60, 2001)
    t = logistic_score(tail, x)
    assert (np.diff(t) > 0).all() and np.isfinite(t).all()
    assert abs(logistic_score(tail, np.array([np.median(tail.knots)]))[0]) < 0.05
    # both tails grow like -log p: the far side of either is as extreme as the p-value says
    np.testing.assert_allclose(t[-1], -tail.log_sf(x[-1:])[0], rtol=1e-6)
    np.testing.assert_allclose(-t[0], -tail.log_cdf(x[:1])[0], rtol=1e-6)


def test_copula_flags_departures_either_way_and_off_the_correlation_band():
    """Statistics each ordinary but jointly not (off their correlation), or one too *typical*:
    the copula flags both; Fisher's one-sided sum sees neither."""
    rng = np.random.default_rng(6)
    cov, tails, t, cop = _copula_data(rng, 5000)
    normal = rng.multivariate_normal(np.zeros(3), cov, 3000)
    off_band = normal.copy()
    off_band[:, 0], off_band[:, 1] = 1.5, -1.5  # each within 2 sd; their correlation says they move together
    too_low = normal.copy()
    too_low[:, 2] = -4.0  # far below: an upper-tail p-value near 1
    fisher = lambda x: combine(np.stack([tl.log_p(x[:, i]) for i, tl in enumerate(tails)], 1), "fisher")  # noqa: E731

    def auroc(score, anom):
        a, b = score(normal), score(anom)
        return (b[:, None] > a[None]).mean()

    copula = lambda x: cop.statistic(t(x))  # noqa: E731
    assert auroc(copula, off_band) > 0.99 and auroc(copula, too_low) > 0.99
    assert auroc(fisher, off_band) < 0.8 and auroc(fisher, too_low) < 0.5


def test_copula_on_reference_data_is_chi_square_like_and_subsets_are_their_own_fit():
    rng = np.random.default_rng(7)
    cov, tails, t, cop = _copula_data(rng, 8000)
    new = t(rng.multivariate_normal(np.zeros(3), cov, 8000))
    # the mean Mahalanobis distance^2 of reference-like data is the dimension (any marginals)
    assert abs(cop.statistic(new).mean() - 3.0) < 0.15
    ref2 = Copula.fit(np.asarray(new[:, [0, 2]]))  # fitted on the two columns alone
    np.testing.assert_allclose(cop.statistic(new[:200, [0, 2]], [0, 2]), ref2.statistic(new[:200, [0, 2]]),
                               rtol=0.1, atol=0.1)
    with pytest.raises(ValueError, match="finite"):
        Copula.fit(np.full((20, 2), np.nan))


def test_harmonic_mean_rule_is_the_log_of_the_summed_inverse_p_values():
    lp = np.log(np.array([[0.5, 0.25, 1.0], [1e-300, 1.0, 1.0], [1e-5, 1e-5, 1e-5]]))
    np.testing.assert_allclose(combine(lp, "hmp"), np.log([2 + 4 + 1, 1e300 + 2, 3e5]), rtol=1e-12)
    # far past float range (log p of -1e4) it stays finite and ordered
    far = combine(np.array([[-1e4, 0.0], [-2e4, 0.0]]), "hmp")
    assert np.isfinite(far).all() and far[1] > far[0]
    # a statistic moved the other way (p = 1) costs less than under Fisher's sum: against the
    # same normal image, the anomaly's score falls by at most log 2 (hmp) vs 2 * -log p_normal (Fisher)
    normal = np.log(np.array([[0.01, 0.3]]))
    wrong_way = np.log(np.array([[0.01, 1.0]]))
    assert combine(normal, "hmp")[0] - combine(wrong_way, "hmp")[0] < np.log(2)
