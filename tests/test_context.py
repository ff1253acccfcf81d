"""The local autoregressive pixel context (vae_model.context): causal, exact, a normalised likelihood."""
import pytest
import torch

from vae_model.checkpoint import load_checkpoint, save_checkpoint
from vae_model.config import VAEConfig
from vae_model.context import PixelContext
from vae_model.distributions import pixel_distribution
from vae_model.errors import ConfigError
from vae_model.model import VAE


def tiny(**kw):
    base = dict(image_size=16, channels=3, widths=(4, 8), latent_dim=4, hidden_dim=16, likelihood="logistic_mixture",
                mixtures=2, context_layers=2, context_width=8)
    base.update(kw)
    torch.manual_seed(0)
    return VAE(VAEConfig(**base)).eval()


def _trained_like(ctx: PixelContext) -> PixelContext:
    """The output layer starts at zero (an untrained head is the factorised model): give it weights."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ctx.out.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return ctx


def test_a_pixel_never_sees_itself_or_later_pixels():
    ctx = _trained_like(PixelContext(channels=3, num_params=20, width=8, layers=3))
    params, x = torch.randn(2, 20, 12, 12), torch.rand(2, 3, 12, 12) * 2 - 1
    base = ctx(params, x)
    for i, j in [(0, 0), (5, 7), (11, 11), (6, 0)]:
        moved = x.clone()
        moved[:, :, i, j] += 0.7
        changed = (ctx(params, moved) - base).abs().amax(dim=(0, 1)) > 0
        order = torch.arange(144).view(12, 12)
        assert not changed[order <= i * 12 + j].any(), (i, j)  # itself and every earlier pixel: unchanged
        if (i, j) != (11, 11):
            assert changed[order > i * 12 + j].any()  # and it does reach later ones


def test_the_window_is_exact_at_every_pixel_and_edge():
    ctx = _trained_like(PixelContext(channels=1, num_params=3, width=6, layers=2))
    params, x = torch.randn(3, 3, 9, 11), torch.rand(3, 1, 9, 11) * 2 - 1
    full = ctx(params, x)
    for i in range(9):
        for j in range(11):
            torch.testing.assert_close(ctx.window(params, x, i, j)[:, :, 0, 0], full[:, :, i, j], rtol=0, atol=1e-6)


@pytest.mark.parametrize("likelihood,channels", [("logistic_mixture", 3), ("discretized_logistic", 1)])
def test_teacher_forced_nll_is_the_chain_rule_of_the_sequential_conditionals(likelihood, channels):
    """log p(x|z) from one pass equals the sum of log p(x_ij | z, x_<ij) evaluated one pixel at a time,
    each from a normalised base distribution: the context's likelihood is normalised."""
    m = tiny(likelihood=likelihood, channels=channels)
    _trained_like(m.context)
    x = torch.randint(0, 256, (2, channels, 16, 16), dtype=torch.uint8)
    z = torch.randn(2, 4)
    with torch.no_grad():
        px = m.decode(z)
        one_pass = px.nll(x.float())
        xs = x.float() / 127.5 - 1.0
        seq = torch.zeros(2)
        for i in range(16):
            for j in range(16):
                d = pixel_distribution(likelihood, m.context.window(px.params, xs, i, j), channels, m.cfg.mixtures)
                seq += d.nll(x[:, :, i:i + 1, j:j + 1].float())
    torch.testing.assert_close(one_pass, seq, rtol=1e-5, atol=1e-3)


def test_untrained_head_is_the_factorised_model():
    with_ctx, without = tiny(), tiny(context_layers=0)
    without.load_state_dict({k: v for k, v in with_ctx.state_dict().items() if not k.startswith("context.")})
    x = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    eps = torch.randn(3, 4)
    torch.testing.assert_close(with_ctx.elbo(x, eps=eps).neg_elbo, without.elbo(x, eps=eps).neg_elbo)


def test_context_learns_local_structure_a_factorised_decoder_cannot():
    """Smooth random images: a pixel is predictable from its left neighbour, not from a 4-d z."""
    torch.manual_seed(0)
    base = torch.rand(64, 3, 4, 4)
    x = (torch.nn.functional.interpolate(base, size=16, mode="bilinear", align_corners=False) * 255).round().to(torch.uint8)
    result = {}
    for layers in (0, 2):
        m = tiny(context_layers=layers).train()
        opt = torch.optim.Adam(m.parameters(), lr=3e-3)
        for _ in range(60):
            loss = m.elbo(x, generator=torch.Generator().manual_seed(0)).neg_elbo.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        result[layers] = m.eval().elbo(x, eps=torch.zeros(64, 4)).bits_per_dim.mean().item()
    assert result[2] < result[0] - 0.5, result


def test_generation_is_sequential_and_valid():
    m = tiny()
    _trained_like(m.context)
    g = torch.Generator().manual_seed(0)
    s = m.sample(2, generator=g, stochastic_pixels=True)
    assert s.shape == (2, 3, 16, 16) and s.dtype == torch.uint8
    assert torch.equal(s, m.sample(2, generator=torch.Generator().manual_seed(0), stochastic_pixels=True))
    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    assert m.reconstruct(x).shape == x.shape
    assert m.interpolate(x[0], x[1], 3).shape == (3, 3, 16, 16)


def test_checkpoint_round_trip_and_config_checks(tmp_path):
    m = tiny()
    _trained_like(m.context)
    path = str(tmp_path / "ctx.safetensors")
    save_checkpoint(m, path)
    back = load_checkpoint(path).model
    assert back.cfg.context_layers == 2 and back.context is not None
    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    eps = torch.randn(2, 4)
    torch.testing.assert_close(back.elbo(x, eps=eps).neg_elbo, m.elbo(x, eps=eps).neg_elbo)
    with pytest.raises(ConfigError, match="bernoulli"):
        VAEConfig(image_size=16, channels=1, widths=(4,), likelihood="bernoulli", context_layers=1)
    with pytest.raises(ConfigError, match="context_layers"):
        VAEConfig(image_size=16, channels=1, widths=(4,), context_layers=9)


def test_cli_trains_evaluates_and_generates_with_a_pixel_context(tmp_path):
    from click.testing import CliRunner
    from model_fixtures import FASHION

    from jobs.cli import cli

    def invoke(*args):
        return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)

    shards = tmp_path / "shards"
    assert invoke("shards", FASHION, shards, "--shard-size", 100, "--limit", 200).exit_code == 0
    ckpt = tmp_path / "ctx.safetensors"
    res = invoke("train", shards, "--out", ckpt, "--epochs", 1, "--batch-size", 32, "--latent-dim", 4, "--widths", "8,16",
                 "--hidden-dim", 32, "--context-layers", 1, "--context-width", 8, "--val-fraction", 0.2, "--quiet")
    assert res.exit_code == 0, res.output
    assert load_checkpoint(str(ckpt)).model.cfg.context_layers == 1
    res = invoke("evaluate", shards, "--checkpoint", ckpt, "--iwae-k", 4, "--limit", 32)
    assert res.exit_code == 0, res.output
    res = invoke("generate", ckpt, "--out", tmp_path / "s.png", "--n", 4)
    assert res.exit_code == 0, res.output
    for name in ("a.png", "b.png"):  # ancestral sampling: seeded, so the same grid twice
        res = invoke("generate", ckpt, "--out", tmp_path / name, "--n", 4, "--stochastic", "--seed", 3)
        assert res.exit_code == 0, res.output
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    res = invoke("train", shards, "--out", tmp_path / "x.safetensors", "--likelihood", "bernoulli", "--context-layers", 1)
    assert res.exit_code != 0 and "bernoulli" in res.output and "Traceback" not in res.output


def test_free_bits_floor_each_dimension_and_leave_the_rest():
    from vae_model import losses
    kl = torch.tensor([[0.1, 2.0, 0.3], [0.2, 4.0, 0.5]], requires_grad=True)  # batch means 0.15, 3.0, 0.4
    out = losses.free_bits_kl(kl, 0.35)
    torch.testing.assert_close(out.mean(), torch.tensor(0.35 + 3.0 + 0.4))
    out.sum().backward()
    assert kl.grad[:, 0].eq(0).all() and kl.grad[:, 1:].eq(1).all()  # only the floored dimension gets no push
    torch.testing.assert_close(losses.free_bits_kl(kl, 0.0), kl.sum(-1))
