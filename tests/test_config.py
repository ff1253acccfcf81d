import pytest

from vae_model.config import VAEConfig
from vae_model.errors import ConfigError


def test_round_trip_through_dict():
    cfg = VAEConfig(image_size=32, channels=3, widths=(16, 32, 64), latent_dim=8)
    assert VAEConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("kwargs, needle", [
    (dict(channels=2), "channels=2"),
    (dict(image_size=30), "not divisible"),
    (dict(image_size=8), "supported sizes"),
    (dict(likelihood="gaussian"), "choose one of"),
    (dict(beta=0.0), "beta"),
    (dict(image_size=16, widths=(8, 8, 8, 8)), "below 2px"),
])
def test_invalid_combinations_say_what_to_change(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        VAEConfig(**kwargs)


def test_unknown_fields_are_refused():
    with pytest.raises(ConfigError, match="newer vaepipe"):
        VAEConfig.from_dict({**VAEConfig().to_dict(), "future_field": 1})


@pytest.mark.parametrize("size, channels", [(28, 1), (32, 3), (64, 3), (48, 1)])
def test_default_architectures_cover_supported_sizes(size, channels):
    cfg = VAEConfig.default_for(size, channels)
    assert cfg.image_size % 2 ** len(cfg.widths) == 0


@pytest.mark.parametrize("kwargs, needle", [(dict(arch="vit"), "arch="), (dict(blocks=0), "blocks="),
                                            (dict(mixtures=0), "mixtures="), (dict(likelihood="gauss"), "likelihood=")])
def test_photo_fields_are_checked(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        VAEConfig(**kwargs)
