"""The model's configuration: one typed dataclass, saved inside every checkpoint."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable

from .errors import ConfigError

LIKELIHOODS = ("bernoulli", "discretized_logistic", "logistic_mixture")
ARCHS = ("plain", "resnet")  # conv trunks (vae_model.model)
SCORES = ("elbo", "iwae", "complexity", "typicality")  # anomaly scores (vae_model.scoring computes them)
NO_SCORE = "none"  # embed only: the encoder's posterior mean; no decoder, no likelihood, null score columns
EMBED_SCORES = (*SCORES, NO_SCORE)  # what ``vaepipe embed --score`` takes
MIN_SIZE, MAX_SIZE = 16, 256


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return (isinstance(v, float) and math.isfinite(v)) or _is_int(v)


# How each field annotation of VAEConfig is stored in JSON: (check, what to write in the error).
_JSON_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "int": (_is_int, "an integer"),
    "float": (_is_real, "a finite number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "tuple[int, ...]": (lambda v: isinstance(v, (list, tuple)) and all(map(_is_int, v)), "a list of integers"),
    "dict[str, Any]": (lambda v: isinstance(v, dict), "a JSON object"),
}


@dataclass(frozen=True)
class VAEConfig:
    """Architecture and objective of a convolutional VAE.

    The encoder halves the resolution once per entry of ``widths`` (stride-2 convs), so
    ``image_size`` must be divisible by ``2 ** len(widths)``; the decoder mirrors it.
    """

    image_size: int = 28  # square images, pixels per side
    channels: int = 1  # 1 (grayscale) or 3 (RGB)
    latent_dim: int = 32  # size of z
    widths: tuple[int, ...] = (32, 64)  # conv channels per resolution level
    hidden_dim: int = 256  # fully connected layer between conv trunk and z
    likelihood: str = "discretized_logistic"  # pixel model p(x|z): see LIKELIHOODS
    beta: float = 1.0  # weight of the KL term (1.0 gives the true ELBO)
    logvar_min: float = -30.0  # posterior log-variance clamp, as in diffusers
    logvar_max: float = 20.0
    extras: dict[str, Any] = field(default_factory=dict, compare=False)  # free-form, saved as is
    # Added since (a checkpoint without them is the plain trunk it was trained with):
    arch: str = "plain"  # plain: two convs per level; resnet: residual blocks with GroupNorm (photos)
    blocks: int = 1  # residual blocks per level (resnet)
    mixtures: int = 5  # logistic components per pixel (likelihood logistic_mixture)
    context_layers: int = 0  # > 0: a local autoregressive pixel context with this many masked layers (vae_model.context)
    context_width: int = 64  # channels of that context

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if self.channels not in (1, 3):
            raise ConfigError(f"channels={self.channels}: use 1 (grayscale) or 3 (RGB)")
        if not MIN_SIZE <= self.image_size <= MAX_SIZE:
            raise ConfigError(f"image_size={self.image_size}: supported sizes are {MIN_SIZE}..{MAX_SIZE} pixels")
        if not self.widths or any(w < 1 for w in self.widths):
            raise ConfigError(f"widths={self.widths}: give one positive channel count per resolution level")
        factor = 2 ** len(self.widths)
        if self.image_size % factor:
            ok = [n for n in range(1, 6) if self.image_size % (2 ** n) == 0]
            raise ConfigError(
                f"image_size={self.image_size} is not divisible by 2**len(widths)={factor}; "
                f"use {len(ok) and max(ok)} or fewer width levels, or resize images to a multiple of {factor}")
        if self.image_size // factor < 2:
            raise ConfigError(f"widths={self.widths} downsample {self.image_size}px to below 2px; use fewer levels")
        if self.latent_dim < 1 or self.hidden_dim < 1:
            raise ConfigError("latent_dim and hidden_dim must be positive")
        if self.likelihood not in LIKELIHOODS:
            raise ConfigError(f"likelihood={self.likelihood!r}: choose one of {', '.join(LIKELIHOODS)}")
        if not self.beta > 0:
            raise ConfigError(f"beta={self.beta}: must be > 0")
        if self.arch not in ARCHS:
            raise ConfigError(f"arch={self.arch!r}: choose one of {', '.join(ARCHS)}")
        if not 1 <= self.blocks <= 8:
            raise ConfigError(f"blocks={self.blocks}: use 1 to 8 residual blocks per level")
        if not 1 <= self.mixtures <= 32:
            raise ConfigError(f"mixtures={self.mixtures}: use 1 to 32 logistic components")
        if not 0 <= self.context_layers <= 8:
            raise ConfigError(f"context_layers={self.context_layers}: use 0 (no pixel context) to 8 masked layers")
        if not 1 <= self.context_width <= 1024:
            raise ConfigError(f"context_width={self.context_width}: use 1 to 1024 channels")
        if self.context_layers and self.likelihood == "bernoulli":
            raise ConfigError("context_layers needs a discretized_logistic or logistic_mixture likelihood, not bernoulli")

    @property
    def num_dims(self) -> int:
        """Number of pixel values per image (for bits/dim)."""
        return self.channels * self.image_size * self.image_size

    @property
    def bottom_size(self) -> int:
        return self.image_size // (2 ** len(self.widths))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VAEConfig":
        """The config a checkpoint stored (:meth:`to_dict`); every field's JSON type is checked
        against its annotation, so a hand-edited ``"image_size": 28.0`` or ``"widths": "a"`` is a
        :class:`ConfigError` naming the field rather than a crash deep in the model."""
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a JSON object of VAEConfig fields, not {type(data).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"unknown config fields {unknown}: the checkpoint was written by a newer vaepipe; upgrade")
        for name, value in data.items():
            ok, what = _JSON_TYPES[str(known[name].type)]
            if not ok(value):
                raise ConfigError(f"config field {name}={repr(value)[:40]}: must be {what}")
        return cls(**{k: (tuple(v) if k == "widths" else v) for k, v in data.items()})

    @classmethod
    def default_for(cls, image_size: int, channels: int, **overrides: Any) -> "VAEConfig":
        """A sensible architecture for a given image size and channel count.

        Widths: one more level per doubling of the size. RGB photographs at 32 px and up also get a
        channel-coupled mixture of 5 logistics per pixel, a 128-d latent and a 512-unit hidden
        layer (BENCHMARKS.md, "Photos", has their bits/dim). The plain trunk stays the default on
        every size: the residual trunk (``arch="resnet"``) costs ~2.8x more per training image on a
        CPU at the same widths, so it is an option for GPU budgets."""
        if channels == 3 and image_size >= 32:
            for key, value in (("likelihood", "logistic_mixture"), ("latent_dim", 128), ("hidden_dim", 512)):
                if overrides.get(key) is None:
                    overrides[key] = value
        levels = {28: (32, 64), 32: (32, 64, 128), 64: (32, 64, 128, 256)}.get(image_size)
        if levels is None:
            levels = tuple(32 * 2 ** i for i in range(4) if image_size % (2 ** (i + 1)) == 0
                           and image_size // 2 ** (i + 1) >= 4) or (32,)
        if overrides.get("widths") is None:
            overrides["widths"] = levels
        return cls(image_size=image_size, channels=channels, **{k: v for k, v in overrides.items() if v is not None})
