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
image even when their likelihood statistics look ordinary.

The score (``typicality_v3``, issue 14) does not add these views but tests them: each statistic
it uses (:data:`DEFAULT_USES`: -ELBO in bits, the complexity, the KDE -log density and the
kNN -log density) gets its tail probability under the validation reference (:class:`vae_model.combine.TailCDF`:
quantile knots plus exponential tails; the densities' reference values leave-one-out), the
p-values are combined by Fisher's method (:data:`vae_model.combine.DEFAULT_RULE`), and the
combined statistic is calibrated against the same reference images' leave-one-out statistics:

    typicality(x) = -log10 P_ref(Fisher(x) >= Fisher_observed)   (3 = one normal image in 1,000)

so that each statistic counts by how rare its value is among normal images, not by its units
(the old sum let the kNN term's scale decide), and thresholds and percentiles are those of a
calibrated p-value. Which statistics and which rule were frozen on the development half of the
anomaly battery (benchmarks/anomaly.py; BENCHMARKS.md, "Anomaly battery"), among Fisher, the
minimum p-value, the harmonic-mean p-value and a truncated product over one- and two-sided
variants and a 10-neighbour latent density (``knn10``: mean log distance to the 10 nearest
reference latents, beside or in place of the nearest one's), and the ``copula`` rule
(vae_model.combine.Copula: the Mahalanobis distance of the statistics' logistic scores under
their correlation over the reference, -ELBO and complexity read both ways, the densities one way). References of earlier
versions (``typicality_v2``: the sum -log p_KDE + m log r_1; KDE-only) keep their score.

The reference is stored in the checkpoint's metadata (a few thousand points), so scoring needs
no data at run time; ``vaepipe calibrate`` refits it on other held-out images.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .combine import DEFAULT_RULE, RULES, Copula, TailCDF, combine, logistic_score
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

    def loo_score(self, chunk: int = 512) -> np.ndarray:
        """:meth:`score` of each reference point against the others (leave-one-out): what a new
        image's score is distributed like, from the reference alone."""
        out = np.empty(len(self.points))
        scale = -0.5 / self.bandwidth ** 2
        p_sq = (self.points ** 2).sum(1)
        for i in range(0, len(self.points), chunk):
            logk = _sq_dists(self.points[i:i + chunk], self.points, p_sq) * scale
            np.fill_diagonal(logk[:, i:i + chunk], -np.inf)
            top = logk.max(1)
            out[i:i + chunk] = -(top + np.log(np.exp(logk - top[:, None]).sum(1)) - np.log(len(self.points) - 1))
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


K_NEAR = 10  # neighbours of the ``knn10`` statistic


@dataclass
class LatentKNN:
    """Nearest-neighbour density of posterior means: -log p(z) = dim * log r_1(z) + const
    (:meth:`score`), and a smoother variant over the :data:`K_NEAR` nearest reference latents,
    dim * mean_j log r_j(z) (:meth:`scores`' second value: the ``knn10`` statistic; the mean of
    the log distances has far less variance than r_1 alone, Loftsgaarden & Quesenberry 1965)."""

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

    def _near(self, d2: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(dim log r_1, dim mean_j<=k log r_j) from squared distances (m, n) to the reference."""
        near = np.partition(d2, k - 1, axis=1)[:, :k] if k < d2.shape[1] else d2
        logs = 0.5 * np.log(np.maximum(near, self.floor ** 2))
        return self.dim * logs.min(1), self.dim * logs.mean(1)

    def scores(self, latents: np.ndarray, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """(``knn``, ``knn10``) of each row: :meth:`score` and the :data:`K_NEAR`-neighbour mean,
        from one pass over the reference."""
        z = np.asarray(latents, dtype=np.float64)
        ref_sq = (self.points ** 2).sum(1)
        one, many = np.empty(len(z)), np.empty(len(z))
        for i in range(0, len(z), chunk):
            one[i:i + chunk], many[i:i + chunk] = self._near(_sq_dists(z[i:i + chunk], self.points, ref_sq),
                                                             min(K_NEAR, len(self.points)))
        return one, many

    def loo_scores(self, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`scores` of each reference point against the others (leave-one-out)."""
        ref_sq = (self.points ** 2).sum(1)
        n = len(self.points)
        one, many = np.empty(n), np.empty(n)
        for i in range(0, n, chunk):
            d2 = _sq_dists(self.points[i:i + chunk], self.points, ref_sq)
            np.fill_diagonal(d2[:, i:i + chunk], np.inf)
            one[i:i + chunk], many[i:i + chunk] = self._near(d2, min(K_NEAR, n - 1))  # never the point itself
        return one, many

    def loo_score(self) -> np.ndarray:
        """:meth:`score` of each reference point against the others (leave-one-out)."""
        return self.loo_scores()[0]

    def to_dict(self) -> dict:
        return {"kind": "latent_knn", "dim": self.dim, "floor": self.floor,
                "points": np.round(self.points, 5).tolist()}

    @classmethod
    def from_dict(cls, d: dict, where: str = "latent") -> "LatentKNN":
        """The reference :meth:`to_dict` wrote, checked; a :class:`ReferenceFormatError` otherwise."""
        return cls(_array(d, "points", where, 2), _positive(d, "dim", where), _positive(d, "floor", where))


# The statistics the recommended score can combine: a name, the base statistic its tail model is fitted
# on, and which departures count (vae_model.combine.TailCDF.log_p). The one-sided ones are monotone
# functions of single scores (``--score elbo``, ``complexity``, the KDE and the latent kNN density); the
# two-sided ``_2s`` variants of -ELBO and complexity also flag images that are too likely (simpler than
# normal ones: the failure of plain likelihoods, Nalisnick et al. 2019) or too well explained for their
# complexity. Which of them the score combines, by which rule, is a design choice frozen on the anomaly
# battery's development half (benchmarks/anomaly.py, BENCHMARKS.md).
STATISTICS = (("nll_bits", "nll_bits", "upper"), ("complexity", "complexity", "upper"), ("kde", "kde", "upper"),
              ("knn", "knn", "upper"), ("nll_bits_2s", "nll_bits", "two"), ("complexity_2s", "complexity", "two"),
              ("knn10", "knn10", "upper"))
ALL_STATISTICS = tuple(name for name, _, _ in STATISTICS)
BASE_OF = {name: base for name, base, _ in STATISTICS}
SIDE_OF = {name: side for name, _, side in STATISTICS}
BASES = ("nll_bits", "complexity", "kde", "knn", "knn10")  # the statistics with a stored tail model
LATER_BASES = ("knn10",)  # added after references were first written: optional in a stored one (needs recalibrating)
COPULA_BASES = ("nll_bits", "complexity", "kde", "knn")  # what the copula's joint reference covers
DEFAULT_USES = ("nll_bits", "complexity", "kde", "knn")  # what the score combines (BENCHMARKS.md, "Anomaly battery")
COMBINED_KIND = "typicality_v3"


@dataclass
class TypicalityReference:
    """The reference of the ``typicality`` score.

    Written since ``typicality_v3`` (``tails`` set): the score combines the tail probabilities of
    :data:`STATISTICS` under the validation reference by ``rule`` (:func:`vae_model.combine.combine`)
    and reports the combined p-value, calibrated on validation images that fitted nothing else,
    as ``-log10 p`` (3 = as rare as one normal image in a thousand). Older references (``tails``
    None: ``typicality_v2`` and the KDE-only kind) keep their score, the sum of the two -log
    densities, so that their rows do not change; ``vaepipe calibrate`` upgrades them.
    """

    kde: KDEReference
    latent: LatentKNN | None = None
    tails: dict[str, TailCDF] | None = None
    rule: str = DEFAULT_RULE
    final: TailCDF | None = None
    uses: tuple[str, ...] = DEFAULT_USES  # the statistics the rule combines (a design choice: BENCHMARKS.md)
    copula: Copula | None = None  # the joint reference of the BASES' logistic scores (the ``copula`` rule)

    @classmethod
    def fit(cls, feats: np.ndarray, latents: np.ndarray, calib_feats: np.ndarray | None = None,
            calib_latents: np.ndarray | None = None, rule: str = DEFAULT_RULE,
            uses: tuple[str, ...] | None = None, combined: bool = True) -> "TypicalityReference":
        """Densities on (``feats``, ``latents``), and each statistic's tail model on the same
        images, the densities' values leave-one-out (each image against the others: distributed
        as a new image's against all of them). The combined statistic is calibrated on
        (``calib_feats``, ``calib_latents``) when given, else on the same images' leave-one-out
        statistics (exchangeable with a new normal image's, so its p-value is calibrated too).
        ``combined=False``: the two-density sum of ``typicality_v2`` (kept for tests of that
        older score)."""
        ref = cls(KDEReference.fit(feats), LatentKNN.fit(latents))
        if not combined:
            return ref
        if rule not in RULES:
            raise ValueError(f"combination rule {rule!r}: choose one of {', '.join(RULES)}")
        uses = tuple(uses or DEFAULT_USES)
        if not uses or not set(uses) <= set(ALL_STATISTICS):
            raise ValueError(f"statistics {list(uses)}: choose among {list(ALL_STATISTICS)}")
        if rule == "copula":
            _copula_bases(uses)  # refused before any fitting
        own = ref.loo_statistics(feats)
        tails = {name: TailCDF.fit(own[name], "upper") for name in BASES}
        copula = Copula.fit(_copula_scores(tails, own, COPULA_BASES))
        ref = cls(ref.kde, ref.latent, tails, rule, uses=uses, copula=copula)
        cal = own if calib_feats is None else ref.statistics(calib_feats, calib_latents)
        ref.final = TailCDF.fit(ref.combine_statistics(cal), "upper")
        return ref

    def loo_statistics(self, feats: np.ndarray) -> dict[str, np.ndarray]:
        """:meth:`statistics` of the reference images themselves, the densities leave-one-out."""
        feats = np.asarray(feats, dtype=np.float64)
        knn, knn10 = self.latent.loo_scores()
        return {"nll_bits": feats[:, 0], "complexity": feats[:, 0] - feats[:, 1], "kde": self.kde.loo_score(),
                "knn": knn, "knn10": knn10}

    def statistics(self, feats: np.ndarray, latents: np.ndarray,
                   bases: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """The base statistics ``bases`` (default every one of :data:`BASES`) for images with
        (-ELBO bits, coder bits) ``feats`` (B, 2) and posterior means ``latents`` (B, D); higher =
        less like the reference (``nll_bits`` and ``complexity`` in bits: their reference may
        also flag low values)."""
        bases = BASES if bases is None else bases
        feats = np.asarray(feats, dtype=np.float64)
        out = {"nll_bits": feats[:, 0], "complexity": feats[:, 0] - feats[:, 1]}
        if "kde" in bases:
            out["kde"] = self.kde.score(feats)
        if self.latent is not None and "knn10" in bases:
            out["knn"], out["knn10"] = self.latent.scores(latents)
        elif self.latent is not None and "knn" in bases:
            out["knn"] = self.latent.score(latents)
        return out

    def log_pvalues(self, feats: np.ndarray, latents: np.ndarray) -> np.ndarray:
        """(B, K) natural-log tail probabilities of the statistics, in :data:`STATISTICS` order."""
        return self.stat_log_pvalues(self.statistics(feats, latents))

    def stat_log_pvalues(self, stats: dict[str, np.ndarray], names: tuple[str, ...] = ALL_STATISTICS) -> np.ndarray:
        """(B, len(names)) log p-values of the statistics ``names`` from already computed base statistics."""
        if self.tails is None:
            raise ValueError("this typicality reference predates tail probabilities: run `vaepipe calibrate`")
        missing = [n for n in names if BASE_OF[n] not in self.tails]
        if missing:
            raise ValueError(f"this typicality reference has no tail model of {', '.join(missing)} (written by an "
                             "older vaepipe): run `vaepipe calibrate`")
        return np.stack([self.tails[BASE_OF[n]].log_p(stats[BASE_OF[n]], SIDE_OF[n]) for n in names], 1)

    def combine_statistics(self, stats: dict[str, np.ndarray], rule: str | None = None,
                           uses: tuple[str, ...] | None = None) -> np.ndarray:
        """The combined statistic of ``uses`` by ``rule`` (default: the stored ones) of base
        statistics, before calibration. ``copula`` takes each statistic's base both ways (a
        ``_2s`` name is its base)."""
        rule, uses = rule or self.rule, uses or self.uses
        if rule == "copula":
            if self.copula is None:
                raise ValueError("this typicality reference has no copula: run `vaepipe calibrate`")
            bases = _copula_bases(uses)
            return self.copula.statistic(_copula_scores(self.tails, stats, bases),
                                         [COPULA_BASES.index(b) for b in bases])
        return combine(self.stat_log_pvalues(stats, tuple(uses)), rule)

    def combined(self, feats: np.ndarray, latents: np.ndarray, rule: str | None = None,
                 uses: tuple[str, ...] | None = None) -> np.ndarray:
        """The combined statistic of ``uses`` by ``rule`` (default: the stored ones), before calibration."""
        uses = uses or self.uses
        return self.combine_statistics(self.statistics(feats, latents, tuple({BASE_OF[u] for u in uses})), rule, uses)

    def calibrated(self, combined: np.ndarray) -> np.ndarray:
        """The score of combined statistics: -log10 of their calibrated p-value."""
        return -self.final.log_sf(combined) / math.log(10.0)

    def loo_score(self, feats: np.ndarray) -> np.ndarray:
        """:meth:`score` of the reference images themselves, leave-one-out (what a new normal
        image's score is distributed like: the score quantiles' sample)."""
        return self.calibrated(self.combine_statistics(self.loo_statistics(feats)))

    def score(self, feats: np.ndarray, latents: np.ndarray) -> np.ndarray:
        if self.tails is None or self.final is None:  # an older reference: its own score, unchanged
            s = self.kde.score(feats)
            return s if self.latent is None else s + self.latent.score(latents)
        return self.calibrated(self.combined(feats, latents))

    def to_dict(self) -> dict:
        d = {"kind": "typicality_v2", "kde": self.kde.to_dict(), "latent": self.latent.to_dict()}
        if self.tails is not None and self.final is not None:
            d.update(kind=COMBINED_KIND, rule=self.rule, uses=list(self.uses), final=self.final.to_dict(),
                     tails={name: t.to_dict() for name, t in self.tails.items()})
            if self.copula is not None:
                d["copula"] = self.copula.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict, latent_dim: int | None = None) -> "TypicalityReference":
        """The one parser of a stored reference (checkpoint meta ``typicality``): checks every
        field's presence, type, shape and finiteness, that the KDE uses the features scoring
        computes and, given ``latent_dim``, that the latent view fits the model. Raises
        :class:`ReferenceFormatError` (a ConfigError, hence a ValueError) naming the field."""
        kind = _field(d, "kind", "")
        if kind in ("typicality_v2", COMBINED_KIND):
            ref = cls(KDEReference.from_dict(_field(d, "kde", "")), LatentKNN.from_dict(_field(d, "latent", "")))
        elif kind == "gaussian_kde_whitened":
            ref = cls(KDEReference.from_dict(d, where=""))  # a KDE-only reference of an earlier version
        else:
            raise ReferenceFormatError(f"typicality reference: kind {repr(kind)[:40]} is not one this vaepipe reads "
                                       f"({COMBINED_KIND}, typicality_v2 or gaussian_kde_whitened); upgrade vaepipe "
                                       "or recalibrate")
        if kind == COMBINED_KIND:
            rule = _field(d, "rule", "")
            if rule not in RULES:
                raise ReferenceFormatError(f"typicality reference: rule {repr(rule)[:40]} is not one of {list(RULES)}")
            tails = _field(d, "tails", "")
            ref.tails = {name: _tail(_field(tails, name, "tails"), f"tails.{name}", "upper") for name in BASES
                         if name not in LATER_BASES or (isinstance(tails, dict) and name in tails)}
            ref.rule, ref.final = rule, _tail(_field(d, "final", ""), "final", "upper")
            uses = _field(d, "uses", "")
            if not (isinstance(uses, list) and uses and all(isinstance(u, str) and u in ALL_STATISTICS for u in uses)):
                raise ReferenceFormatError(f"typicality reference: uses must list some of {list(ALL_STATISTICS)}")
            ref.uses = tuple(uses)
            lacking = [u for u in uses if BASE_OF[u] not in ref.tails]
            if lacking:
                raise ReferenceFormatError(f"typicality reference: uses {lacking} without tails for them")
            if "copula" in d:
                ref.copula = _copula(d["copula"])
            elif rule == "copula":
                raise ReferenceFormatError("typicality reference: rule 'copula' needs its copula field")
        if ref.kde.features != FEATURES:
            raise ReferenceFormatError(f"typicality reference: kde.features {list(ref.kde.features)} are not the "
                                       f"features scoring computes {list(FEATURES)}")
        if latent_dim is not None and ref.latent is not None and ref.latent.points.shape[1] != latent_dim:
            raise ReferenceFormatError(f"typicality reference: latent.points are {ref.latent.points.shape[1]}-d, "
                                       f"the model's latent is {latent_dim}-d")
        return ref


def _copula_bases(uses) -> list[str]:
    """The distinct base statistics of ``uses``, which the copula's joint reference must cover."""
    bases = list(dict.fromkeys(BASE_OF[name] for name in uses))
    if any(b not in COPULA_BASES for b in bases):
        raise ValueError(f"the copula rule combines some of {list(COPULA_BASES)}, not {list(uses)}")
    return bases


ONE_WAY = ("kde", "knn")  # densities: closer to the reference than usual is not an anomaly


def _copula_scores(tails: dict[str, TailCDF], stats: dict[str, np.ndarray], bases) -> np.ndarray:
    """(B, len(bases)) logistic scores of base statistics for the ``copula`` rule. -ELBO and the
    complexity count both ways (too likely, too simple); the densities only above their reference
    median, so that a near-duplicate of a calibration image (a latent distance of ~0) is ordinary."""
    cols = []
    for b in bases:
        t = logistic_score(tails[b], stats[b])
        cols.append(np.maximum(t, 0.0) if b in ONE_WAY else t)
    return np.stack(cols, 1)


def _copula(d: Any, where: str = "copula") -> Copula:
    """A :meth:`Copula.to_dict` over :data:`COPULA_BASES`, checked: shapes, finiteness, positive
    spreads, a symmetric correlation with unit diagonal."""
    k = len(COPULA_BASES)
    mean, std, corr = _array(d, "mean", where, 1), _array(d, "std", where, 1), _array(d, "corr", where, 2)
    if mean.shape != (k,) or std.shape != (k,) or corr.shape != (k, k):
        raise ReferenceFormatError(f"typicality reference: {where} must describe the {k} statistics "
                                   f"{list(COPULA_BASES)}")
    if (std <= 0).any() or not np.allclose(corr, corr.T) or not np.allclose(np.diag(corr), 1.0, atol=1e-6):
        raise ReferenceFormatError(f"typicality reference: {where} needs positive std and a correlation matrix")
    return Copula(mean, std, corr)


def _tail(d: Any, where: str, side: str) -> TailCDF:
    """A :meth:`TailCDF.to_dict`, checked: non-decreasing finite knots, positive scales, the side
    :data:`STATISTICS` gives the statistic."""
    knots = _array(d, "knots", where, 1)
    if len(knots) < 2 or (np.diff(knots) < 0).any():
        raise ReferenceFormatError(f"typicality reference: {where}.knots must be at least 2 non-decreasing numbers")
    if _field(d, "side", where) != side:
        raise ReferenceFormatError(f"typicality reference: {where}.side must be {side!r}")
    return TailCDF(knots, _positive(d, "lo_scale", where), _positive(d, "hi_scale", where), side)


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
