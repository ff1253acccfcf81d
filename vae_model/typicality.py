"""Typicality: how unusual an image is among validation images, in two independent views.

Plain likelihoods rank simple out-of-distribution images (MNIST under a Fashion-MNIST model) as
*more* likely (Nalisnick et al. 2019). The input-complexity correction (Serra et al. 2020)
subtracts a lossless coder's length L(x) from -log2 p(x). Typicality goes one step further in the
spirit of DoSE (Morningstar et al. 2021): it keeps both statistics, s(x) = (-ELBO(x) in bits,
L(x) in bits), fits a kernel density to s over held-out in-distribution images, and scores
-log density. In-distribution images fall on a narrow, correlated band in that plane; anomalies
fall off it in either direction (too complex, or too simple for how well the model explains them).

The second view is where the encoder puts the image: a k-nearest-neighbour density of the
posterior mean among the validation images' posterior means, p(z) ~ 1 / r_1(z)^m, where r_1 is
the distance to the nearest reference latent and m the intrinsic dimension of the reference set
(Levina & Bickel 2004 maximum-likelihood estimate; the latent has D coordinates but the images
occupy a lower-dimensional part of it). Images of another domain land away from every validation
image even when their likelihood statistics look ordinary. The score is the sum of the two
-log densities (their product density, treating the views as independent):

    typicality(x) = -log p_KDE(-ELBO bits, L(x)) + m * log r_1(mu(x))

The reference is stored in the checkpoint's metadata (a few thousand points), so scoring needs
no data at run time; ``vaepipe calibrate`` refits it on other held-out images.
"""
from __future__ import annotations

from dataclasses import dataclass

import math
from typing import Any

import numpy as np

from .errors import ConfigError

FEATURES = ("neg_elbo_bits", "code_bits")


class ReferenceFormatError(ConfigError):
    """A stored typicality reference that is not one: a field missing, of the wrong type or shape,
    or not finite. The message names the field (``kde.whiten``, ``latent.points``, ...)."""


def _name(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _field(d: Any, key: str, where: str) -> Any:
    if not isinstance(d, dict):
        raise ReferenceFormatError(f"typicality reference: {where or 'it'} must be a JSON object, "
                                   f"not {type(d).__name__}")
    if key not in d:
        raise ReferenceFormatError(f"typicality reference: {_name(where, key)} is missing")
    return d[key]


def _array(d: Any, key: str, where: str, ndim: int) -> np.ndarray:
    name, value = _name(where, key), _field(d, key, where)
    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ReferenceFormatError(f"typicality reference: {name} is not a (rectangular) array of numbers") from None
    if a.ndim != ndim or a.size == 0:
        raise ReferenceFormatError(f"typicality reference: {name} has shape {a.shape}, expected a non-empty "
                                   f"{ndim}-d array")
    if not np.isfinite(a).all():
        raise ReferenceFormatError(f"typicality reference: {name} has non-finite values")
    return a


def _positive(d: Any, key: str, where: str) -> float:
    v = _field(d, key, where)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
        raise ReferenceFormatError(f"typicality reference: {_name(where, key)}={repr(v)[:40]} must be a finite number > 0")
    return float(v)


def _sq_dists(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances (len(a), len(b)) by expansion (one matrix product), clipped at
    0; ``b_sq`` = (b ** 2).sum(1). Inputs here are centred or of latent scale, so the expansion
    loses nothing that matters."""
    d2 = (a ** 2).sum(1)[:, None] + b_sq[None] - 2.0 * a @ b.T
    return np.maximum(d2, 0.0, out=d2)


@dataclass
class KDEReference:
    """A Gaussian KDE in whitened coordinates (Scott's bandwidth times ``bw_factor``)."""

    mean: np.ndarray  # (d,)
    whiten: np.ndarray  # (d, d): z = (x - mean) @ whiten has identity covariance
    points: np.ndarray  # (n, d) whitened reference points
    bandwidth: float
    features: tuple[str, ...] = FEATURES

    @classmethod
    def fit(cls, feats: np.ndarray, bw_factor: float = 1.0, features: tuple[str, ...] = FEATURES) -> "KDEReference":
        feats = np.asarray(feats, dtype=np.float64)
        n, d = feats.shape
        if n < 2 * d + 2:
            raise ValueError(f"need more than {2 * d + 1} reference images for a {d}-d density, got {n}")
        mean = feats.mean(0)
        cov = np.cov(feats.T) + 1e-9 * np.eye(d)
        whiten = np.linalg.cholesky(np.linalg.inv(cov))
        bandwidth = bw_factor * n ** (-1.0 / (d + 4))
        return cls(mean, whiten, (feats - mean) @ whiten, float(bandwidth), tuple(features))

    def score(self, feats: np.ndarray, chunk: int = 512) -> np.ndarray:
        """-log density (up to a constant shared by all images) of each row of ``feats``."""
        z = (np.asarray(feats, dtype=np.float64) - self.mean) @ self.whiten
        out = np.empty(len(z))
        scale = -0.5 / self.bandwidth ** 2
        p_sq = (self.points ** 2).sum(1)
        for i in range(0, len(z), chunk):
            logk = _sq_dists(z[i:i + chunk], self.points, p_sq)  # (m, n); whitened coordinates
            logk *= scale
            top = logk.max(1)
            logk -= top[:, None]
            np.exp(logk, out=logk)
            out[i:i + chunk] = -(top + np.log(logk.sum(1)) - np.log(len(self.points)))
        return out

    def to_dict(self) -> dict:
        return {"kind": "gaussian_kde_whitened", "features": list(self.features), "mean": self.mean.tolist(),
                "whiten": self.whiten.tolist(), "bandwidth": self.bandwidth,
                "points": np.round(self.points, 6).tolist()}

    @classmethod
    def from_dict(cls, d: dict, where: str = "kde") -> "KDEReference":
        """The reference :meth:`to_dict` wrote, checked (shapes agree, values finite); a
        :class:`ReferenceFormatError` naming the field otherwise."""
        mean = _array(d, "mean", where, 1)
        n_dim = len(mean)
        whiten, points = _array(d, "whiten", where, 2), _array(d, "points", where, 2)
        if whiten.shape != (n_dim, n_dim) or points.shape[1] != n_dim:
            raise ReferenceFormatError(f"typicality reference: {_name(where, 'whiten')} {whiten.shape} and "
                                       f"{_name(where, 'points')} {points.shape} do not fit {_name(where, 'mean')} "
                                       f"({n_dim},)")
        features = _field(d, "features", where)
        if not (isinstance(features, list) and len(features) == n_dim and all(isinstance(f, str) for f in features)):
            raise ReferenceFormatError(f"typicality reference: {_name(where, 'features')} must list {n_dim} "
                                       "feature names")
        return cls(mean, whiten, points, _positive(d, "bandwidth", where), tuple(features))


def intrinsic_dimension(points: np.ndarray, k: int = 5, chunk: int = 1024) -> float:
    """Levina-Bickel maximum-likelihood intrinsic dimension of a point set (leave-one-out,
    ``k`` neighbours, averaged as MacKay & Ghahramani suggest: inverse of the mean inverse)."""
    x = np.asarray(points, dtype=np.float64)
    n = len(x)
    if n <= k + 1:
        raise ValueError(f"need more than {k + 1} points to estimate a dimension, got {n}")
    sq = (x ** 2).sum(1)
    inv = np.empty(n)
    for i in range(0, n, chunk):
        d2 = _sq_dists(x[i:i + chunk], x, sq)
        np.fill_diagonal(d2[:, i:i + chunk], np.inf)  # leave each point out of its own neighbours
        near = np.sqrt(np.maximum(np.partition(d2, k - 1, axis=1)[:, :k], 1e-24))
        near.sort(1)
        inv[i:i + chunk] = np.log(near[:, -1:] / near[:, :-1]).sum(1) / (k - 1)
    return float(1.0 / max(inv.mean(), 1e-12))


@dataclass
class LatentKNN:
    """Nearest-neighbour density of posterior means: -log p(z) = dim * log r_1(z) + const."""

    points: np.ndarray  # (n, D) reference posterior means
    dim: float  # intrinsic dimension of the reference set
    floor: float  # smallest distance used (duplicates of a reference image would give log 0)

    @classmethod
    def fit(cls, latents: np.ndarray) -> "LatentKNN":
        pts = np.asarray(latents, dtype=np.float64)
        if pts.ndim != 2 or len(pts) < 8:
            raise ValueError(f"need at least 8 reference latents (n, D), got shape {pts.shape}")
        # Stored rounded to 5 decimals (to_dict); fewer distinct points than neighbours would give
        # an intrinsic dimension of ~1e12 and scores of ~-1e13.
        distinct = len(np.unique(np.round(pts, 5), axis=0))
        if distinct <= 5:
            raise ValueError(f"the {len(pts)} reference images have only {distinct} distinct latents (duplicate "
                             "images?): calibrate on varied held-out images")
        dim = intrinsic_dimension(pts)
        return cls(pts, dim, 1e-6)

    def nearest(self, latents: np.ndarray, chunk: int = 512) -> np.ndarray:
        """Distance of each row to its nearest reference latent."""
        z = np.asarray(latents, dtype=np.float64)
        ref_sq = (self.points ** 2).sum(1)
        out = np.empty(len(z))
        for i in range(0, len(z), chunk):
            out[i:i + chunk] = np.sqrt(_sq_dists(z[i:i + chunk], self.points, ref_sq).min(1))
        return np.maximum(out, self.floor)

    def score(self, latents: np.ndarray) -> np.ndarray:
        return self.dim * np.log(self.nearest(latents))

    def to_dict(self) -> dict:
        return {"kind": "latent_knn", "dim": self.dim, "floor": self.floor,
                "points": np.round(self.points, 5).tolist()}

    @classmethod
    def from_dict(cls, d: dict, where: str = "latent") -> "LatentKNN":
        """The reference :meth:`to_dict` wrote, checked; a :class:`ReferenceFormatError` otherwise."""
        return cls(_array(d, "points", where, 2), _positive(d, "dim", where), _positive(d, "floor", where))


@dataclass
class TypicalityReference:
    """Both views; ``latent`` is None for references written before it existed (KDE only)."""

    kde: KDEReference
    latent: LatentKNN | None = None

    @classmethod
    def fit(cls, feats: np.ndarray, latents: np.ndarray) -> "TypicalityReference":
        return cls(KDEReference.fit(feats), LatentKNN.fit(latents))

    def score(self, feats: np.ndarray, latents: np.ndarray) -> np.ndarray:
        s = self.kde.score(feats)
        return s if self.latent is None else s + self.latent.score(latents)

    def to_dict(self) -> dict:
        return {"kind": "typicality_v2", "kde": self.kde.to_dict(), "latent": self.latent.to_dict()}

    @classmethod
    def from_dict(cls, d: dict, latent_dim: int | None = None) -> "TypicalityReference":
        """The one parser of a stored reference (checkpoint meta ``typicality``): checks every
        field's presence, type, shape and finiteness, that the KDE uses the features scoring
        computes and, given ``latent_dim``, that the latent view fits the model. Raises
        :class:`ReferenceFormatError` (a ConfigError, hence a ValueError) naming the field."""
        kind = _field(d, "kind", "")
        if kind == "typicality_v2":
            ref = cls(KDEReference.from_dict(_field(d, "kde", "")), LatentKNN.from_dict(_field(d, "latent", "")))
        elif kind == "gaussian_kde_whitened":
            ref = cls(KDEReference.from_dict(d, where=""))  # a KDE-only reference of an earlier version
        else:
            raise ReferenceFormatError(f"typicality reference: kind {repr(kind)[:40]} is not one this vaepipe reads "
                                       "(typicality_v2 or gaussian_kde_whitened); upgrade vaepipe or recalibrate")
        if ref.kde.features != FEATURES:
            raise ReferenceFormatError(f"typicality reference: kde.features {list(ref.kde.features)} are not the "
                                       f"features scoring computes {list(FEATURES)}")
        if latent_dim is not None and ref.latent is not None and ref.latent.points.shape[1] != latent_dim:
            raise ReferenceFormatError(f"typicality reference: latent.points are {ref.latent.points.shape[1]}-d, "
                                       f"the model's latent is {latent_dim}-d")
        return ref



def required_reference(score: str, reference: Any, source: str = "the checkpoint") -> Any:
    """The stored typicality reference ``score`` needs: None for every score but ``typicality``,
    which needs the checkpoint's (meta ``typicality``). The one statement of that rule: scoring
    (:class:`vae_model.scoring.ScoreOptions`, which then parses it) and the embed driver's check
    call this; the reference's format is :meth:`TypicalityReference.from_dict`'s to check.

    Raises:
        ConfigError: the score needs the reference and it is missing; ``source`` (the
            checkpoint's URL) names where.
    """
    if score != "typicality":
        return None
    if not reference:
        raise ConfigError(f"{source} has no typicality reference (trained by an older vaepipe?); "
                          "retrain it or use --score complexity")
    return reference
