"""Calibration statistics: what a checkpoint stores about its validation images' scores.

:func:`fit_reference` scores held-out normal images once and returns the two things embed
needs to turn a score into a decision: the typicality reference (:mod:`vae_model.typicality`)
and, per score, a :func:`quantile_table`. :func:`percentile_of` and :func:`threshold_for` read
such a table back (``anomaly_percentile`` and ``is_anomaly`` of every row). Training calls
this at its end and ``vaepipe calibrate`` refits it; the checkpoint seals the result with
:func:`vae_model.checkpoint_header.calibration_id`.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .combine import DEFAULT_RULE, TAIL_MASS

from .losses import LN2
from .model import VAE
from .scoring import ScoreOptions, score_all
from .typicality import TypicalityReference

QUANTILES = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)
TAIL_DECADES = tuple(range(4, 16))  # extrapolated knots 1 - 10^-k (quantile_table)


def fit_reference(model: VAE, images: np.ndarray | torch.Tensor, opts: ScoreOptions,
                  device: torch.device | str = "cpu", rule: str = DEFAULT_RULE,
                  uses: tuple[str, ...] | None = None) -> tuple[dict, dict[str, dict[str, float]], dict]:
    """Validation statistics stored in a checkpoint: the typicality reference (densities and
    per-statistic tail models fitted on all ``images``: the densities sharpen with more points;
    the combined statistic of ``rule`` calibrated on the same images' leave-one-out statistics),
    the quantiles of every score (typicality's of those leave-one-out scores, so that its
    percentiles are not flattered by scoring the reference's own points) and the
    :func:`embedding_stats` of every image (drift's reference: pipeline.drift)."""
    base = score_all(model, images, ScoreOptions("complexity", opts.iwae_k, opts.seed, codec=opts.codec), device)
    iwae = score_all(model, images, ScoreOptions("iwae", opts.iwae_k, opts.seed), device)
    feats = np.stack([-base["elbo"] / LN2, base["code_bits"]], 1)
    if len(feats) < 32:
        raise ValueError(f"{len(feats)} validation images are too few to fit the typicality reference "
                         "(need at least 32; more gives sharper scores)")
    ref = TypicalityReference.fit(feats, base["embedding"], rule=rule, uses=uses)
    tables = {"elbo": quantile_table(-base["elbo"]), "iwae": quantile_table(iwae["anomaly_score"]),
              "complexity": quantile_table(base["complexity"]), "typicality": quantile_table(ref.loo_score(feats))}
    return ref.to_dict(), tables, embedding_stats(base["embedding"])


def embedding_stats(embeddings: np.ndarray) -> dict:
    """{"n", "mean", "cov"} of posterior means (N, D): the unbiased mean and covariance that
    embed's drift check compares a partition's embeddings with."""
    x = np.asarray(embeddings, dtype=np.float64)
    return {"n": int(len(x)), "mean": x.mean(0).tolist(), "cov": np.cov(x, rowvar=False).reshape(x.shape[1], -1).tolist()}


def quantile_table(scores: np.ndarray, quantiles: tuple[float, ...] = QUANTILES) -> dict[str, float]:
    """{"0.5": v, ...} plus min/max and n, for percentiles and thresholds later.

    Past what n scores resolve (quantiles above 1 - 1/n), knots ``"0.9999"`` ... ``"0.9999999999999"``
    (1 - 10^-k, k = 4..15) are extrapolated by the exponential tail of the scores past their 0.95
    quantile (:data:`vae_model.combine.TAIL_MASS`; the maximum-likelihood scale of the exceedances),
    so that ``anomaly_percentile`` keeps ranking images past every validation score instead of
    saturating at 100 (it does past the last knot, p ~ 1e-15, near float64's resolution at 100)."""
    scores = np.asarray(scores, dtype=np.float64)
    qs = np.quantile(scores, quantiles)
    table = {f"{q:g}": float(v) for q, v in zip(quantiles, qs)}
    top = float(np.quantile(scores, 1 - TAIL_MASS))
    excess = scores[scores > top] - top
    if len(excess):
        scale = max(float(excess.mean()), 1e-12 * max(abs(top), 1.0))
        for k in TAIL_DECADES:
            if 10.0 ** -k < 1.0 / len(scores):
                table["0." + "9" * k] = max(top + scale * math.log(TAIL_MASS * 10.0 ** k), float(qs[-1]))
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
