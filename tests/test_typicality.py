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


# -- the latent view -------------------------------------------------------------------------

from vae_model.typicality import LatentKNN, TypicalityReference, intrinsic_dimension  # noqa: E402


def _subspace(n, dim, ambient, rng):
    """Points on a random dim-dimensional linear subspace of R^ambient (like posterior means)."""
    basis = np.linalg.qr(rng.normal(size=(ambient, dim)))[0]
    return rng.normal(size=(n, dim)) @ basis.T


@pytest.mark.parametrize("dim", [2, 5])
def test_intrinsic_dimension_recovers_a_known_dimension(dim):
    rng = np.random.default_rng(dim)
    est = intrinsic_dimension(_subspace(2000, dim, 16, rng))
    assert abs(est - dim) < 0.25 * dim + 0.3, est


def test_latent_density_falls_with_distance_from_the_reference():
    rng = np.random.default_rng(4)
    knn = LatentKNN.fit(_subspace(1000, 3, 8, rng))
    inside = _subspace(200, 3, 8, np.random.default_rng(4))[:200] * 0.5  # same subspace, near the bulk
    outside = inside + 3.0 * rng.normal(size=inside.shape)  # off the subspace
    assert np.median(knn.score(outside)) > np.quantile(knn.score(inside), 0.95)
    # The score is dim * log(distance to the nearest reference point): check one by hand.
    z = outside[:1]
    r = np.sqrt(((knn.points - z) ** 2).sum(1)).min()
    np.testing.assert_allclose(knn.score(z)[0], knn.dim * np.log(r), rtol=1e-9)
    # An exact duplicate of a reference point gets a finite score.
    assert np.isfinite(knn.score(knn.points[:1])).all()


def test_typicality_adds_both_views_and_round_trips():
    rng = np.random.default_rng(5)
    feats, lat = _band(600, rng), _subspace(600, 3, 8, rng)
    ref = TypicalityReference.fit(feats, lat)
    tf, tl = _band(30, rng), _subspace(30, 3, 8, rng)
    np.testing.assert_allclose(ref.score(tf, tl), ref.kde.score(tf) + ref.latent.score(tl))
    again = TypicalityReference.from_dict(ref.to_dict())
    np.testing.assert_allclose(again.score(tf, tl), ref.score(tf, tl), atol=1e-3)


def test_a_reference_without_the_latent_view_still_scores():
    rng = np.random.default_rng(6)
    kde = KDEReference.fit(_band(300, rng))
    old = TypicalityReference.from_dict(kde.to_dict())  # what earlier checkpoints store
    tf = _band(10, rng)
    np.testing.assert_allclose(old.score(tf, np.zeros((10, 4))), kde.score(tf))


def test_only_the_typicality_score_requires_a_reference():
    from vae_model.errors import ConfigError
    from vae_model.typicality import required_reference

    assert all(required_reference(s, None) is None for s in ("elbo", "iwae", "complexity"))
    ref = {"kind": "typicality_v2"}
    assert required_reference("typicality", ref) is ref
    with pytest.raises(ConfigError, match=r"^m\.safetensors has no typicality reference .* --score complexity$"):
        required_reference("typicality", {}, "m.safetensors")
