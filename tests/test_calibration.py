"""vae_model.calibration: the validation statistics a checkpoint stores, and reading them back."""
import numpy as np
import pytest

from vae_model.calibration import percentile_of, quantile_table, threshold_for


def test_percentiles_and_thresholds_follow_the_quantile_table():
    scores = np.random.default_rng(0).normal(size=10_000)
    table = quantile_table(scores)
    assert threshold_for(table, 0.99) == pytest.approx(np.quantile(scores, 0.99))
    pct = percentile_of(np.array([table["min"] - 1, table["0.5"], table["0.99"], table["max"] + 1]), table)
    np.testing.assert_allclose(pct, [0, 50, 99, 100])
