"""Typicality: how unusual an image's (likelihood, complexity) pair is among validation images.

Plain likelihoods rank simple out-of-distribution images (MNIST under a Fashion-MNIST model) as
*more* likely (Nalisnick et al. 2019). The input-complexity correction (Serra et al. 2020)
subtracts a lossless coder's length L(x) from -log2 p(x). Typicality goes one step further in the
spirit of DoSE (Morningstar et al. 2021): it keeps both statistics, s(x) = (-ELBO(x) in bits,
L(x) in bits), fits a kernel density to s over held-out in-distribution images, and scores
-log density. In-distribution images fall on a narrow, correlated band in that plane; anomalies
fall off it in either direction (too complex, or too simple for how well the model explains them).

The reference is stored in the checkpoint's metadata (a few thousand numbers), so scoring needs
no data at run time.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FEATURES = ("neg_elbo_bits", "code_bits")


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
        h2 = self.bandwidth ** 2
        for i in range(0, len(z), chunk):
            d2 = ((z[i:i + chunk, None, :] - self.points[None]) ** 2).sum(-1)  # (m, n)
            logk = -0.5 * d2 / h2
            top = logk.max(1)
            out[i:i + chunk] = -(top + np.log(np.exp(logk - top[:, None]).sum(1)) - np.log(len(self.points)))
        return out

    def to_dict(self) -> dict:
        return {"kind": "gaussian_kde_whitened", "features": list(self.features), "mean": self.mean.tolist(),
                "whiten": self.whiten.tolist(), "bandwidth": self.bandwidth,
                "points": np.round(self.points, 6).tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "KDEReference":
        return cls(np.asarray(d["mean"], float), np.asarray(d["whiten"], float), np.asarray(d["points"], float),
                   float(d["bandwidth"]), tuple(d["features"]))
