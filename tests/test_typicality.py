import numpy as np
import pytest

from vae_model.typicality import KDEReference


def _band(n, rng):
    """In-distribution statistics: a narrow correlated band, like (-ELBO bits, coder bits)."""
    code = rng.normal(3600, 400, n)
    nll = 0.8 * code + rng.normal(0, 40, n)
    return np.stack([nll, code], 1)


def test_points_on_the_band_score_lower_than_points_off_it():
    rng = np.random.default_rng(0)
    ref = KDEReference.fit(_band(2000, rng))
    on = _band(500, rng)
    # Simple images that the model explains "too well" for their complexity, and vice versa.
    too_likely = on.copy()
    too_likely[:, 0] -= 400
    too_unlikely = on.copy()
    too_unlikely[:, 0] += 400
    s_on, s_lo, s_hi = ref.score(on), ref.score(too_likely), ref.score(too_unlikely)
    assert (s_lo > np.quantile(s_on, 0.99)).mean() > 0.95
    assert (s_hi > np.quantile(s_on, 0.99)).mean() > 0.95
    # A one-sided likelihood score would call the too-likely points the most normal of all.
    assert on[:, 0].mean() > too_likely[:, 0].mean()


def test_score_is_invariant_to_units():
    rng = np.random.default_rng(1)
    feats = _band(800, rng)
    test = _band(50, rng)
    a = KDEReference.fit(feats).score(test)
    scale = np.array([np.log(2), 8.0])  # e.g. nats instead of bits, bytes instead of bits
    b = KDEReference.fit(feats * scale).score(test * scale)
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)


def test_round_trip_through_checkpoint_metadata():
    rng = np.random.default_rng(2)
    ref = KDEReference.fit(_band(300, rng))
    again = KDEReference.from_dict(ref.to_dict())
    test = _band(20, rng)
    np.testing.assert_allclose(ref.score(test), again.score(test), atol=1e-4)


def test_chunking_does_not_change_scores():
    rng = np.random.default_rng(3)
    ref = KDEReference.fit(_band(500, rng))
    test = _band(100, rng)
    np.testing.assert_allclose(ref.score(test, chunk=7), ref.score(test, chunk=1000))


def test_too_few_reference_points_is_refused():
    with pytest.raises(ValueError, match="reference images"):
        KDEReference.fit(np.zeros((3, 2)))
