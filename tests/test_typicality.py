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


def test_ten_neighbour_latent_density_by_hand_and_leave_one_out():
    from vae_model.typicality import K_NEAR

    rng = np.random.default_rng(12)
    knn = LatentKNN.fit(_subspace(400, 3, 8, rng))
    z = _subspace(5, 3, 8, rng) + 0.5 * rng.normal(size=(5, 8))
    one, many = knn.scores(z)
    d = np.sort(np.sqrt(((z[:, None] - knn.points[None]) ** 2).sum(-1)), 1)
    np.testing.assert_allclose(one, knn.score(z), rtol=1e-9)
    np.testing.assert_allclose(many, knn.dim * np.log(d[:, :K_NEAR]).mean(1), rtol=1e-9)
    # Leave-one-out: each reference point against the others, never itself.
    lo_one, lo_many = knn.loo_scores()
    np.testing.assert_allclose(lo_one, knn.loo_score(), rtol=1e-9)
    i = 7
    di = np.sort(np.sqrt(((knn.points[i] - np.delete(knn.points, i, 0)) ** 2).sum(-1)))
    np.testing.assert_allclose(lo_many[i], knn.dim * np.log(di[:K_NEAR]).mean(), rtol=1e-9)
    # Smoother than the nearest neighbour alone: less spread over new reference-like points
    # relative to the gap between inside and outside points.
    inside = _subspace(300, 3, 8, np.random.default_rng(13)) * 0.5
    outside = inside + 2.0 * np.random.default_rng(14).normal(size=inside.shape)
    sep = lambda a, b: (np.median(b) - np.median(a)) / np.std(a)  # noqa: E731
    (i1, i10), (o1, o10) = knn.scores(inside), knn.scores(outside)
    assert sep(i10, o10) > sep(i1, o1) > 0


def test_typicality_adds_both_views_and_round_trips():
    rng = np.random.default_rng(5)
    feats, lat = _band(600, rng), _subspace(600, 3, 8, rng)
    ref = TypicalityReference.fit(feats, lat, combined=False)
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


# -- the combined score (typicality_v3) ------------------------------------------------------

def _combined(rng, rule="fisher", n=1500, new=200):
    """A v3 reference fitted on n normal images, and ``new`` more normal images (features, latents)."""
    feats, lat = _band(n + new, rng), _subspace(n + new, 3, 8, rng)  # one subspace for all
    ref = TypicalityReference.fit(feats[:1000], lat[:1000], feats[1000:n], lat[1000:n], rule)
    return ref, feats[n:], lat[n:]


@pytest.mark.parametrize("rule", ["fisher", "tpm", "minp", "hmp", "copula"])
def test_combined_score_is_calibrated_on_new_reference_images(rule):
    """-log10 p of new normal images: p ~ uniform (past tpm's atom), so a 1% threshold flags ~1%."""
    rng = np.random.default_rng(7)
    ref, feats, lat = _combined(rng, rule, new=4000)
    s = ref.score(feats, lat)
    p = 10.0 ** -s
    for q in (0.01, 0.1) + ((0.5,) if rule != "tpm" else ()):
        assert abs((p < q).mean() - q) < 4 * np.sqrt(q * (1 - q) / 500) + 0.003, (q, (p < q).mean())


def test_combined_score_is_monotone_in_each_statistic_and_round_trips():
    rng = np.random.default_rng(8)
    ref, feats, lat = _combined(rng)
    base = ref.score(feats, lat)
    lp = ref.log_pvalues(feats, lat)
    # Each statistic's p-value made smaller, the others held: the score does not fall.
    for i in range(lp.shape[1]):
        smaller = lp.copy()
        smaller[:, i] -= 1.0
        from vae_model.combine import combine
        after = -ref.final.log_sf(combine(smaller, ref.rule)) / np.log(10)
        assert (after >= base - 1e-9).all()
    # A latent far from every reference point raises the score (knn's p falls), pixels unchanged.
    assert (ref.score(feats, lat + 5.0) > base).all()
    again = TypicalityReference.from_dict(ref.to_dict())
    assert ref.to_dict()["kind"] == "typicality_v3"
    np.testing.assert_allclose(again.score(feats, lat), base, rtol=1e-4, atol=1e-4)


def test_combined_score_ranks_far_anomalies_without_ties():
    """Images far past every reference image keep distinct, ordered scores (no 1/n floor)."""
    rng = np.random.default_rng(9)
    ref, feats, lat = _combined(rng, new=3)
    s = [ref.score(feats, lat + d)[0] for d in (3.0, 10.0, 30.0)]
    assert s[0] < s[1] < s[2] and np.isfinite(s).all() and s[0] > 2


def test_a_v3_reference_with_a_bad_tail_is_refused():
    from vae_model.typicality import ReferenceFormatError

    d = _combined(np.random.default_rng(10))[0].to_dict()
    d["tails"]["knn"]["side"] = "two"
    with pytest.raises(ReferenceFormatError, match=r"tails.knn.side must be 'upper'"):
        TypicalityReference.from_dict(d)
    del d["tails"]["kde"]
    with pytest.raises(ReferenceFormatError, match=r"tails.kde is missing"):
        TypicalityReference.from_dict(d)


def test_a_reference_written_before_knn10_still_scores_and_refuses_to_use_it():
    from vae_model.typicality import ReferenceFormatError

    ref, feats, lat = _combined(np.random.default_rng(15), new=20)
    d = ref.to_dict()
    del d["tails"]["knn10"]  # what a checkpoint calibrated by the previous vaepipe stores
    old = TypicalityReference.from_dict(d)
    stored = TypicalityReference.from_dict(ref.to_dict())  # the same rounding of stored values
    np.testing.assert_allclose(old.score(feats, lat), stored.score(feats, lat), rtol=1e-12)
    with pytest.raises(ReferenceFormatError, match=r"uses \['knn10'\] without tails"):
        TypicalityReference.from_dict({**d, "uses": ["nll_bits", "knn10"]})
    with pytest.raises(ValueError, match="no tail model of knn10"):
        old.combine_statistics(old.statistics(feats, lat), "fisher", ("knn10",))
    with pytest.raises(ValueError, match="copula rule combines some of"):
        TypicalityReference.fit(feats, lat, rule="copula", uses=("nll_bits", "knn10"))


@pytest.mark.parametrize("rule", ["fisher", "hmp"])
def test_a_score_over_knn10_round_trips(rule):
    rng = np.random.default_rng(16)
    feats, lat = _band(900, rng), _subspace(900, 3, 8, rng)
    ref = TypicalityReference.fit(feats[:800], lat[:800], rule=rule, uses=("nll_bits", "complexity", "knn10"))
    again = TypicalityReference.from_dict(ref.to_dict())
    new_f, new_l = feats[800:], lat[800:]
    np.testing.assert_allclose(again.score(new_f, new_l), ref.score(new_f, new_l), atol=1e-4)
    assert (ref.score(new_f, new_l + 5.0) > ref.score(new_f, new_l)).mean() > 0.95  # far latents rank higher


def test_the_combined_statistics_are_stored_and_checked():
    rng = np.random.default_rng(11)
    feats, lat = _band(1200, rng), _subspace(1200, 3, 8, rng)
    ref = TypicalityReference.fit(feats[:800], lat[:800], feats[800:1100], lat[800:1100], "minp", ("kde", "knn"))
    d = ref.to_dict()
    assert d["uses"] == ["kde", "knn"] and d["rule"] == "minp"
    again = TypicalityReference.from_dict(d)
    np.testing.assert_allclose(again.score(feats[1100:], lat[1100:]), ref.score(feats[1100:], lat[1100:]), atol=1e-4)
    np.testing.assert_allclose(ref.combined(feats[1100:], lat[1100:]), -ref.log_pvalues(feats[1100:], lat[1100:])[:, 2:4].min(1))
    from vae_model.typicality import ReferenceFormatError

    with pytest.raises(ReferenceFormatError, match="uses must list some of"):
        TypicalityReference.from_dict({**d, "uses": ["kde", "pixels"]})
    with pytest.raises(ValueError, match="statistics"):
        TypicalityReference.fit(feats[:800], lat[:800], feats[800:], lat[800:], uses=("bogus",))


@pytest.mark.parametrize("rule", ["fisher", "minp", "copula"])
def test_leave_one_out_calibration_is_calibrated_on_new_images(rule):
    """Fitted without a separate calibration set, the combined score is calibrated on the
    reference's own leave-one-out statistics: new normal images' p-values are ~uniform, and the
    leave-one-out scores (the score quantiles' sample) are distributed like theirs."""
    rng = np.random.default_rng(12)
    feats, lat = _band(6000, rng), _subspace(6000, 3, 8, rng)
    ref = TypicalityReference.fit(feats[:2000], lat[:2000], rule=rule)
    p = 10.0 ** -ref.score(feats[2000:], lat[2000:])
    loo = ref.loo_score(feats[:2000])
    for q in (0.01, 0.05, 0.1, 0.5):
        assert abs((p < q).mean() - q) < 4 * np.sqrt(q * (1 - q) / 2000) + 0.003, (q, (p < q).mean())
    np.testing.assert_allclose(np.quantile(loo, [0.5, 0.9, 0.99]),
                               np.quantile(ref.score(feats[2000:], lat[2000:]), [0.5, 0.9, 0.99]), rtol=0.15)


def test_two_sided_statistics_flag_images_that_are_too_likely():
    """-ELBO far *below* every reference image (a simpler image than normal ones): the one-sided
    statistic calls it ordinary, its two-sided variant rare; far above, both rare."""
    from vae_model.typicality import ALL_STATISTICS

    rng = np.random.default_rng(13)
    feats, lat = _band(1500, rng), _subspace(1500, 3, 8, rng)
    ref = TypicalityReference.fit(feats, lat)
    nll = feats[:, 0]
    probe = np.stack([[nll.min() - 5 * nll.std(), feats[0, 1]], [nll.max() + 5 * nll.std(), feats[0, 1]]])
    lp = ref.log_pvalues(probe, lat[:2])
    one, two = ALL_STATISTICS.index("nll_bits"), ALL_STATISTICS.index("nll_bits_2s")
    assert lp[0, one] > np.log(0.9) and lp[0, two] < np.log(1e-3)
    assert lp[1, one] < np.log(1e-3) and lp[1, two] < np.log(2e-3)


def test_the_copula_rule_flags_too_likely_images_and_round_trips():
    """The copula reads each statistic both ways: -ELBO far *below* every reference image (with its
    coder length unchanged) is rare for it, ordinary for the one-sided Fisher sum."""
    from vae_model.typicality import ReferenceFormatError

    rng = np.random.default_rng(14)
    feats, lat = _band(1501, rng), _subspace(1501, 3, 8, rng)
    new_feats, new_lat, feats, lat = feats[1500:], lat[1500:], feats[:1500], lat[:1500]
    uses = ("nll_bits", "complexity", "knn")  # the one-sided statistics (the KDE flags any far point)
    cop = TypicalityReference.fit(feats, lat, rule="copula", uses=uses)
    fisher = TypicalityReference.fit(feats, lat, rule="fisher", uses=uses)
    nll = feats[:, 0]
    probe = np.stack([[nll.min() - 5 * nll.std(), new_feats[0, 1]]])
    assert cop.score(probe, new_lat)[0] > 3 and fisher.score(probe, new_lat)[0] < 1
    assert cop.score(new_feats, new_lat)[0] < 3
    d = cop.to_dict()
    assert d["rule"] == "copula" and len(d["copula"]["corr"]) == 4
    again = TypicalityReference.from_dict(d)
    np.testing.assert_allclose(again.score(feats[:50], lat[:50]), cop.score(feats[:50], lat[:50]), rtol=1e-4, atol=1e-4)
    # the reference's own images (a latent distance of 0: "too typical") are not flagged
    assert (cop.score(feats[:300], lat[:300]) > 3).mean() < 0.01
    # the same reference combines any subset by any rule (the battery's candidates)
    sub = cop.combine_statistics(cop.statistics(feats[:50], lat[:50]), "copula", ("nll_bits_2s", "kde"))
    assert sub.shape == (50,) and np.isfinite(sub).all()
    bad = {**d, "copula": {**d["copula"], "corr": [[1.0, 2.0], [2.0, 1.0]]}}
    with pytest.raises(ReferenceFormatError, match="copula must describe the 4 statistics"):
        TypicalityReference.from_dict(bad)
    with pytest.raises(ReferenceFormatError, match="needs its copula"):
        TypicalityReference.from_dict({k: v for k, v in d.items() if k != "copula"})
