"""Detection metrics for anomaly scores (higher score = more anomalous), numpy only."""
from __future__ import annotations

import numpy as np


def auroc(normal: np.ndarray, anomalous: np.ndarray) -> float:
    """Area under the ROC curve = P(score_anomalous > score_normal), ties counted half."""
    s = np.concatenate([normal, anomalous])
    ranks = _average_ranks(s)
    n0, n1 = len(normal), len(anomalous)
    return float((ranks[n0:].sum() - n1 * (n1 + 1) / 2) / (n0 * n1))


def auprc(normal: np.ndarray, anomalous: np.ndarray) -> float:
    """Average precision with the anomalies as the positive class."""
    s = np.concatenate([normal, anomalous])
    y = np.concatenate([np.zeros(len(normal)), np.ones(len(anomalous))])
    order = np.argsort(-s, kind="mergesort")
    y = y[order]
    tp = np.cumsum(y)
    precision = tp / np.arange(1, len(y) + 1)
    return float((precision * y).sum() / y.sum())


def fpr_at_tpr(normal: np.ndarray, anomalous: np.ndarray, tpr: float = 0.95) -> float:
    """Fraction of normal images flagged at the threshold that catches ``tpr`` of anomalies."""
    thr = np.quantile(anomalous, 1 - tpr)
    return float(np.mean(normal >= thr))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    # average ties
    sx = x[order]
    i = 0
    while i < len(sx):
        j = i
        while j + 1 < len(sx) and sx[j + 1] == sx[i]:
            j += 1
        if j > i:
            ranks[order[i:j + 1]] = (i + j + 2) / 2
        i = j + 1
    return ranks
