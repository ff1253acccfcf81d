import math

import torch

from vae_model.distributions import (BernoulliPixels, DiagonalGaussian, DiscretizedLogisticPixels,
                                     standard_normal_log_prob)


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
