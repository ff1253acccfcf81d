import math

import pytest
import torch

from vae_model import losses
from vae_model.config import VAEConfig
from vae_model.model import VAE
from vae_model.noise import noise_for_keys


def tiny(**kw):
    base = dict(image_size=16, channels=1, widths=(4, 8), latent_dim=4, hidden_dim=16)
    base.update(kw)
    torch.manual_seed(0)
    return VAE(VAEConfig(**base)).eval()


@pytest.mark.parametrize("likelihood", ["bernoulli", "discretized_logistic"])
@pytest.mark.parametrize("channels", [1, 3])
def test_per_sample_shapes(likelihood, channels):
    m = tiny(likelihood=likelihood, channels=channels)
    x = torch.randint(0, 256, (5, channels, 16, 16), dtype=torch.uint8)
    t = m.elbo(x, generator=torch.Generator().manual_seed(0))
    for v in (t.recon_nll, t.kl, t.neg_elbo, t.bits_per_dim):
        assert v.shape == (5,)
    assert t.mean.shape == (5, 4)
    assert m.iwae(x, 7).shape == (5,)
    assert m.sample(3).shape == (3, channels, 16, 16) and m.sample(3).dtype == torch.uint8
    assert m.reconstruct(x).shape == x.shape
    assert m.interpolate(x[0], x[1], 6).shape == (6, channels, 16, 16)


def test_wrong_image_shape_is_refused():
    with pytest.raises(ValueError, match="expected images of shape"):
        tiny().elbo(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))


def test_bits_per_dim_conversion():
    nats = torch.tensor([784 * math.log(2)])
    assert losses.bits_per_dim(nats, 784).item() == pytest.approx(1.0)
    m = tiny()
    x = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8)
    t = m.elbo(x, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(t.bits_per_dim, t.neg_elbo / (256 * math.log(2)))


def test_elbo_below_iwae_and_iwae_increases_with_k():
    m = tiny()
    x = torch.randint(0, 256, (16, 1, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        elbo = torch.stack([-m.elbo(x, generator=torch.Generator().manual_seed(s)).neg_elbo for s in range(20)]).mean(0)
        iw = {k: torch.stack([m.iwae(x, k, generator=torch.Generator().manual_seed(s)) for s in range(5)]).mean(0)
              for k in (1, 10, 100)}
    # IWAE-1 is the ELBO; the bound tightens on average as k grows.
    assert abs(iw[1].mean() - elbo.mean()) < 0.5
    assert iw[10].mean() > elbo.mean()
    assert iw[100].mean() > iw[10].mean()
    assert (iw[100] >= elbo - 1.0).all()


def test_iwae_chunking_gives_the_same_estimate():
    m = tiny()
    x = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    eps = torch.randn(50, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = m.iwae(x, 50, eps=eps, chunk_size=50)
        chunked = m.iwae(x, 50, eps=eps, chunk_size=7)
    torch.testing.assert_close(full, chunked, atol=1e-4, rtol=1e-5)


def test_scores_do_not_depend_on_batch_composition():
    m = tiny()
    x = torch.randint(0, 256, (6, 1, 16, 16), dtype=torch.uint8)
    keys = [f"k{i}" for i in range(6)]
    with torch.no_grad():
        full = m.elbo(x, eps=noise_for_keys(keys, (4,))).neg_elbo
        part = m.elbo(x[2:4], eps=noise_for_keys(keys[2:4], (4,))).neg_elbo
    torch.testing.assert_close(full[2:4], part, atol=1e-4, rtol=1e-5)


def test_sampling_is_seeded():
    m = tiny()
    def draw(seed):
        return m.sample(4, generator=torch.Generator().manual_seed(seed), stochastic_pixels=True)
    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


def test_64px_rgb_works_end_to_end():
    torch.manual_seed(0)
    m = VAE(VAEConfig.default_for(64, 3, latent_dim=8, hidden_dim=32, widths=(8, 8, 16, 16))).eval()
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        t = m.elbo(x, eps=torch.randn(2, 8))
    assert t.neg_elbo.shape == (2,) and torch.isfinite(t.neg_elbo).all()
    assert m.sample(2).shape == (2, 3, 64, 64)


def test_bf16_autocast_keeps_the_elbo_within_one_percent():
    m = tiny()
    x = torch.randint(0, 256, (32, 1, 16, 16), dtype=torch.uint8)
    eps = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m.elbo(x, eps=eps).neg_elbo
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = m.elbo(x, eps=eps).neg_elbo
    assert low.dtype == torch.float32  # the likelihood itself is evaluated in float32
    assert ((low - ref).abs() / ref.abs()).max() < 0.01


def test_precise_scoring_is_float64_and_matches():
    m = tiny()
    x = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8)
    eps = torch.randn(8, 4)
    with torch.no_grad():
        a = m.elbo(x, eps=eps).neg_elbo
        b = m.elbo(x, eps=eps, precise=True).neg_elbo
    assert b.dtype == torch.float64
    torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-3)


def _photo_model(**kw):
    torch.manual_seed(0)
    base = dict(latent_dim=8, hidden_dim=32, widths=(8, 16), mixtures=3)
    base.update(kw)
    return VAE(VAEConfig.default_for(32, 3, **base)).eval()


def test_rgb_photo_defaults_are_the_residual_trunk_with_the_coupled_mixture():
    cfg = VAEConfig.default_for(32, 3)
    assert (cfg.arch, cfg.likelihood, cfg.latent_dim, cfg.widths) == ("plain", "logistic_mixture", 128, (32, 64, 128))
    grey = VAEConfig.default_for(28, 1)
    assert (grey.arch, grey.likelihood, grey.latent_dim) == ("plain", "discretized_logistic", 32)
    old = VAEConfig().to_dict()
    for name in ("arch", "blocks", "mixtures"):  # a checkpoint written before these fields existed
        old.pop(name)
    assert VAEConfig.from_dict(old).arch == "plain"


@pytest.mark.parametrize("arch, likelihood", [("resnet", "logistic_mixture"), ("resnet", "discretized_logistic"),
                                              ("plain", "logistic_mixture")])
def test_photo_architectures_score_sample_and_chunk_iwae(arch, likelihood):
    m = _photo_model(arch=arch, likelihood=likelihood, blocks=2)
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    eps = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        t = m.elbo(x, eps=eps)
        k_eps = torch.randn(9, 5, 8, generator=torch.Generator().manual_seed(2))
        full, chunked = m.iwae(x, 9, eps=k_eps, chunk_size=9), m.iwae(x, 9, eps=k_eps, chunk_size=2)
    assert torch.isfinite(t.neg_elbo).all() and t.mean.shape == (5, 8)
    torch.testing.assert_close(full, chunked, atol=1e-4, rtol=1e-5)
    s = m.sample(2, generator=torch.Generator().manual_seed(0), stochastic_pixels=True)
    assert s.shape == (2, 3, 32, 32) and s.dtype == torch.uint8
    assert m.reconstruct(x).shape == x.shape


def test_groupnorm_trunk_rows_do_not_depend_on_the_batch():
    """GroupNorm normalises each image alone: an image scores the same alone or in a batch."""
    m = _photo_model()
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    eps = torch.randn(6, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = m.elbo(x, eps=eps, precise=True)
        one = m.elbo(x[3:4], eps=eps[3:4], precise=True)
    torch.testing.assert_close(full.mean[3:4], one.mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(full.neg_elbo[3:4], one.neg_elbo, atol=0, rtol=1e-6)


def test_photo_model_learns_a_batch():
    """A few optimiser steps on one batch lower its -ELBO (the trunk and likelihood are trainable)."""
    m = _photo_model().train()
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)
    first = None
    for _ in range(15):
        loss = m(x, generator=g).neg_elbo.mean()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 100
