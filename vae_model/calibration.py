"""Calibration statistics: what a checkpoint stores about its validation images' scores.

:func:`fit_reference` scores held-out normal images once and returns the two things embed
needs to turn a score into a decision: the typicality reference (:mod:`vae_model.typicality`)
and, per score, a :func:`quantile_table`. :func:`percentile_of` and :func:`threshold_for` read
such a table back (``anomaly_percentile`` and ``is_anomaly`` of every row). Training calls
this at its end and ``vaepipe calibrate`` refits it; the checkpoint seals the result with
:func:`vae_model.checkpoint_header.calibration_id`.
"""
from __future__ import annotations

import numpy as np
import torch

from .losses import LN2
from .model import VAE
from .scoring import ScoreOptions, score_all
from .typicality import TypicalityReference

QUANTILES = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)


def fit_reference(model: VAE, images: np.ndarray | torch.Tensor, opts: ScoreOptions,
                  device: torch.device | str = "cpu",
                  fit_fraction: float = 0.75) -> tuple[dict, dict[str, dict[str, float]], dict]:
    """Validation statistics stored in a checkpoint: the typicality reference (fitted on the first
    ``fit_fraction`` of ``images``: its densities sharpen with more points), the quantiles of
    every score (typicality's on the rest, so that its percentiles are not flattered by scoring
    the reference's own points) and the :func:`embedding_stats` of every image (drift's
    reference: pipeline.drift)."""
    base = score_all(model, images, ScoreOptions("complexity", opts.iwae_k, opts.seed, codec=opts.codec), device)
    iwae = score_all(model, images, ScoreOptions("iwae", opts.iwae_k, opts.seed), device)
    feats = np.stack([-base["elbo"] / LN2, base["code_bits"]], 1)
    cut = int(len(feats) * fit_fraction)
    if cut < 16 or len(feats) - cut < 8:
        raise ValueError(f"{len(feats)} validation images are too few to fit the typicality reference "
                         "(need at least 32; more gives sharper scores)")
    ref = TypicalityReference.fit(feats[:cut], base["embedding"][:cut])
    held = ref.score(feats[cut:], base["embedding"][cut:])
    tables = {"elbo": quantile_table(-base["elbo"]), "iwae": quantile_table(iwae["anomaly_score"]),
              "complexity": quantile_table(base["complexity"]), "typicality": quantile_table(held)}
    return ref.to_dict(), tables, embedding_stats(base["embedding"])


def embedding_stats(embeddings: np.ndarray) -> dict:
    """{"n", "mean", "cov"} of posterior means (N, D): the unbiased mean and covariance that
    embed's drift check compares a partition's embeddings with."""
    x = np.asarray(embeddings, dtype=np.float64)
    return {"n": int(len(x)), "mean": x.mean(0).tolist(), "cov": np.cov(x, rowvar=False).reshape(x.shape[1], -1).tolist()}


def quantile_table(scores: np.ndarray, quantiles: tuple[float, ...] = QUANTILES) -> dict[str, float]:
    """{"0.5": v, ...} plus min/max, for percentiles and thresholds later."""
    qs = np.quantile(scores, quantiles)
    table = {f"{q:g}": float(v) for q, v in zip(quantiles, qs)}
    table["min"], table["max"] = float(np.min(scores)), float(np.max(scores))
    table["n"] = int(len(scores))
    return table


def percentile_of(scores: np.ndarray, table: dict[str, float]) -> np.ndarray:
    """Approximate percentile (0..100) of each score within the validation distribution, by
    piecewise-linear interpolation through the stored quantiles (clipped to [0, 100])."""
    qs, vs = _quantile_curve(table)
    return 100.0 * np.interp(scores, vs, qs, left=0.0, right=1.0)


def threshold_for(table: dict[str, float], quantile: float) -> float:
    """Score at a validation quantile (interpolated through the stored table)."""
    qs, vs = _quantile_curve(table)
    return float(np.interp(quantile, qs, vs))


def _quantile_curve(table: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """(quantiles 0..1, non-decreasing score values) from a :func:`quantile_table`."""
    pts = sorted((float(k), v) for k, v in table.items() if k not in ("min", "max", "n"))
    qs = [0.0] + [q for q, _ in pts] + [1.0]
    vs = [table.get("min", pts[0][1])] + [v for _, v in pts] + [table.get("max", pts[-1][1])]
    return np.asarray(qs), np.maximum.accumulate(np.asarray(vs, dtype=np.float64))
