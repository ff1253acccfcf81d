import math

import torch

from vae_model.distributions import (BernoulliPixels, DiagonalGaussian, DiscretizedLogisticPixels,
                                     LogisticMixturePixels, standard_normal_log_prob)


def test_analytic_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(4, 6, generator=g)
    logvar = torch.randn(4, 6, generator=g) * 0.5
    q = DiagonalGaussian(mean, logvar)
    z = q.sample(generator=g, n=200_000)  # (N, B, D)
    mc = (q.log_prob(z) - standard_normal_log_prob(z)).mean(0)
    torch.testing.assert_close(mc, q.kl(), atol=0.03, rtol=0.01)


def test_kl_is_per_sample_and_zero_at_prior():
    q = DiagonalGaussian(torch.zeros(3, 5), torch.zeros(3, 5))
    assert q.kl().shape == (3,)
    assert torch.allclose(q.kl(), torch.zeros(3))


def test_logvar_is_clamped_and_mode_is_mean():
    q = DiagonalGaussian(torch.ones(2, 3), torch.full((2, 3), 100.0), logvar_max=20.0)
    assert q.logvar.max().item() == 20.0
    assert torch.equal(q.mode(), q.mean)


def test_discretized_logistic_sums_to_one_over_256_values():
    g = torch.Generator().manual_seed(1)
    # Several locations/scales, including very sharp and very flat ones and edge locations.
    loc = torch.tensor([-1.2, -1.0, -0.3, 0.0, 0.5, 0.999, 1.3])
    log_scale = torch.tensor([-6.0, -4.0, -2.0, 0.0, 1.0, -3.0, -5.0])
    params = torch.cat([loc, log_scale]).view(1, 2, 1, 7).expand(256, 2, 1, 7)
    d = DiscretizedLogisticPixels(params)
    values = torch.arange(256.0).view(256, 1, 1, 1).expand(256, 1, 1, 7)
    total = d.log_prob_values(values).exp().sum(0)  # sum over v
    torch.testing.assert_close(total, torch.ones_like(total), atol=2e-3, rtol=0)
    del g


def test_discretized_logistic_nll_is_per_sample_and_positive():
    params = torch.zeros(5, 2, 4, 4)
    target = torch.randint(0, 256, (5, 1, 4, 4)).float()
    nll = DiscretizedLogisticPixels(params).nll(target)
    assert nll.shape == (5,) and (nll > 0).all()


def test_bernoulli_nll_matches_formula():
    logits = torch.tensor([[[[0.0, 2.0]]]])
    target = torch.tensor([[[[1.0, 0.0]]]])
    expected = math.log(2) + math.log1p(math.exp(2.0))
    assert abs(BernoulliPixels(logits).nll(target).item() - expected) < 1e-5


def _mixture_params(channels, k, seed=0, pixels=1):
    g = torch.Generator().manual_seed(seed)
    n = LogisticMixturePixels.num_params(channels, k)
    p = torch.randn((1, n, 1, pixels), generator=g, dtype=torch.float64)
    p[:, k:k + k * channels] *= 0.6  # locations around the middle of [-1, 1], some near the edges
    p[:, k + k * channels:k + 2 * k * channels] = p[:, k + k * channels:k + 2 * k * channels] - 2.5  # log scales
    return p


def test_logistic_mixture_sums_to_one_over_all_rgb_values():
    """The channel-coupled mixture is normalised over the 256**3 colours: for a few red values
    the sum over every (g, b) equals the red marginal sum_k pi_k p_k(r), and those marginals sum
    to one over r."""
    k = 3
    params = _mixture_params(3, k)
    v = torch.arange(256.0, dtype=torch.float64)
    g, b = torch.meshgrid(v, v, indexing="ij")
    red = LogisticMixturePixels(params.expand(256, -1, -1, -1), channels=3, mixtures=k)
    pi = torch.softmax(red.logits[0, :, 0, 0], 0)
    from vae_model.distributions import discretized_logistic_log_prob
    marg = (pi[:, None] * discretized_logistic_log_prob(v[None], red.loc[0, :, 0, 0, :1], red.log_scale[0, :, 0, 0, :1])
            .exp()).sum(0)  # (256,): p(r)
    assert abs(marg.sum().item() - 1.0) < 1e-6  # bins of mass < 1e-5 use the density at the centre
    for r in (0, 37, 128, 255):
        vals = torch.stack([torch.full_like(g, r), g, b]).reshape(3, -1).T.reshape(-1, 3, 1, 1)
        d = LogisticMixturePixels(params.expand(len(vals), -1, -1, -1), channels=3, mixtures=k)
        assert abs(d.log_prob_pixels(vals).exp().sum().item() - marg[r].item()) < 1e-6


def test_logistic_mixture_greyscale_sums_to_one_and_one_component_is_the_logistic():
    p = _mixture_params(1, 4, seed=2, pixels=5).expand(256, -1, -1, -1)
    d = LogisticMixturePixels(p, channels=1, mixtures=4)
    vals = torch.arange(256.0, dtype=torch.float64).view(256, 1, 1, 1).expand(256, 1, 1, 5)
    torch.testing.assert_close(d.log_prob_pixels(vals).exp().sum(0), torch.ones(1, 5, dtype=torch.float64))
    one = _mixture_params(1, 1, seed=3, pixels=5)  # one component, no coupling: the plain discretized logistic
    mix = LogisticMixturePixels(one, channels=1, mixtures=1).nll(vals[:1] * 0 + 77)
    plain = DiscretizedLogisticPixels(one[:, 1:]).nll(vals[:1] * 0 + 77)
    torch.testing.assert_close(mix, plain)


def test_channel_coupling_pays_for_a_shared_colour_error_once():
    """When R, G and B move together, coupling G to R and B to G predicts them: with coefficients
    ~ +1 a grey pixel far from the locations is much likelier than without coupling."""
    k, c = 1, 3
    p = torch.zeros((1, LogisticMixturePixels.num_params(c, k), 1, 1), dtype=torch.float64)
    p[:, k + k * c:k + 2 * k * c] = -3.0  # log scales; all locations 0
    coupled = p.clone()
    coupled[:, k + 2 * k * c] = 20.0  # a = tanh(20) ~ 1: mu_G = x_R
    coupled[:, k + 2 * k * c + 2] = 20.0  # c ~ 1: mu_B = x_G (b = 0)
    x = torch.full((1, 3, 1, 1), 220.0, dtype=torch.float64)
    ll_coupled = -LogisticMixturePixels(coupled, c, k).nll(x)
    ll_free = -LogisticMixturePixels(p, c, k).nll(x)
    assert ll_coupled > ll_free + 5.0


def test_logistic_mixture_samples_and_means_are_valid_pixels():
    p = _mixture_params(3, 5, pixels=64).float()
    d = LogisticMixturePixels(p, channels=3, mixtures=5)
    s = d.sample_image(torch.Generator().manual_seed(0))
    m = d.mean_image()
    assert s.shape == m.shape == (1, 3, 1, 64)
    assert s.min() >= 0 and s.max() <= 255 and torch.equal(s, s.round())
    assert m.min() >= 0 and m.max() <= 255


def test_mixture_nll_in_row_bands_equals_the_whole_image(monkeypatch):
    torch.manual_seed(3)
    p = torch.randn(4, 5 * 10, 12, 7, dtype=torch.float64)
    t = torch.randint(0, 256, (4, 3, 12, 7)).double()
    whole = -LogisticMixturePixels(p, channels=3, mixtures=5).log_prob_pixels(t).reshape(4, -1).sum(-1)
    monkeypatch.setattr(LogisticMixturePixels, "chunk_values", 4 * 5 * 3 * 7 * 5)  # bands of 5 rows: 5, 5, 2
    banded = LogisticMixturePixels(p, channels=3, mixtures=5).nll(t)
    torch.testing.assert_close(banded, whole, rtol=1e-13, atol=0)
    one = LogisticMixturePixels(p[1:2], channels=3, mixtures=5).nll(t[1:2])  # each image's bands are its own rows
    torch.testing.assert_close(one, banded[1:2], rtol=1e-13, atol=0)
