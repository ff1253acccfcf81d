"""vae_model.calibration: the validation statistics a checkpoint stores, and reading them back."""
import numpy as np
import pytest

from vae_model.calibration import percentile_of, quantile_table, threshold_for


def test_percentiles_and_thresholds_follow_the_quantile_table():
    scores = np.random.default_rng(0).normal(size=10_000)
    table = quantile_table(scores)
    assert threshold_for(table, 0.99) == pytest.approx(np.quantile(scores, 0.99))
    pct = percentile_of(np.array([table["min"] - 1, table["0.5"], table["0.99"]]), table)
    np.testing.assert_allclose(pct, [0, 50, 99])


def test_percentiles_resolve_the_tail_past_the_largest_validation_score():
    """Past the largest of n validation scores the table's exponential tail keeps ranking:
    images farther out get higher percentiles, close to the true tail probability."""
    rng = np.random.default_rng(1)
    scores = rng.exponential(size=2000)
    table = quantile_table(scores)
    assert "0.9999" in table and "0.9999999999999" in table and "0.999" in table
    far = np.array([table["max"] + 1, table["max"] + 5, 20.0, 25.0])
    pct = percentile_of(far, table)
    assert (np.diff(pct) > 0).all() and (pct < 100).all() and pct[0] > 99.9
    # Exponential(1): P(S > 20) = 2e-9; the extrapolated percentile is near 100 * (1 - 2e-9).
    assert 1e-10 < 1 - pct[2] / 100 < 1e-7
    assert percentile_of(np.array([1e6]), table)[0] == 100.0  # past the last knot (p ~ 1e-13)


def test_tail_knots_are_only_added_past_what_the_scores_resolve():
    table = quantile_table(np.random.default_rng(2).normal(size=100_000))
    assert "0.9999" not in table and "0.999999" in table
