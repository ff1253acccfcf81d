"""Drift of one partition: does tonight's data look like the data the model was calibrated on?

Computed by the manifest step from the partition's rows (every file in it, ``--mode append``'s
kept shards included) and stored as the manifest's ``drift`` section. Each statistic gets a
verdict, ``pass``, ``warn`` or ``fail`` against the thresholds below, or ``skipped`` with the
reason (no previous partition, no stored embedding statistics, a score without quantiles, ...):

``flagged_rate``     the share of ``is_anomaly`` rows vs 1 - threshold quantile. The threshold is
                     an order statistic of the n validation scores, so its exceedance rate is
                     itself Beta(n - h, h + 1) (h = (n - 1) q): the p-value is the beta-binomial
                     test (the plain binomial test, which ignores that, is reported beside it).
``percentile_uniform``  ``anomaly_percentile`` against uniform. The percentile is exact at the
                     checkpoint's stored quantiles and interpolated between them, so the KS
                     distance is taken at those quantiles (a lower bound of the full one) and its
                     p-value counts the n validation scores (two-sample); PSI over bins of the
                     stored quantiles, each of at least 5% of the mass.
``score_vs_previous``  ``anomaly_score`` against the previous ``dt=`` partition under the same
                     OUT (the latest earlier date with ``_SUCCESS`` and the same model,
                     calibration and score): exact two-sample KS and PSI over its deciles.
``embedding_shift``  the posterior means' mean against the validation images' (stored at
                     calibration: ``embedding_stats``): two-sample Hotelling T^2 p-value; the
                     Mahalanobis distance of the means and the Gaussian KL are reported.

A p-value below :data:`P_FAIL` fails and below :data:`P_WARN` warns; a PSI from
:data:`PSI_WARN` warns and from :data:`PSI_FAIL` fails (the usual PSI conventions).
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import math
import re
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pipeline.drift_stats import (beta_binomial_test, binomial_test, gaussian_kl, hotelling_two_sample,
                                  ks_p_value, ks_two_sample, mahalanobis, psi)
from vae_model.storage import StorageOptions, fresh_fs, join

log = logging.getLogger(__name__)

# 6 statistics a night, 365 nights a year: at 0.001 an undrifted partition fails about twice a year.
P_FAIL = 0.001
P_WARN = 0.01
PSI_WARN = 0.1  # "some shift" by the usual PSI convention
PSI_FAIL = 0.25  # "significant shift"
MIN_BIN_MASS = 0.05  # percentile PSI bins: stored quantiles merged until each holds this much
SCORE_BINS = 10  # score PSI against the previous partition: its deciles
VERDICTS = ("pass", "warn", "fail", "skipped")
DRIFT_EXIT_CODE = 3  # `vaepipe embed --fail-on-drift` when a verdict fails (after every output is written)
_DT = re.compile(r"^dt=(\d{4}-\d{2}-\d{2})$")


def p_verdict(p: float) -> str:
    if not math.isfinite(p):
        return "skipped"
    return "fail" if p < P_FAIL else "warn" if p < P_WARN else "pass"


def psi_verdict(value: float) -> str:
    return "fail" if value >= PSI_FAIL else "warn" if value >= PSI_WARN else "pass"


def worst(*verdicts: str) -> str:
    ran = [v for v in verdicts if v != "skipped"]
    return max(ran, key=("pass", "warn", "fail").index) if ran else "skipped"


def _skipped(reason: str) -> dict:
    return {"verdict": "skipped", "reason": reason}


def _round(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(f"{x:.6g}")


# -- the statistics --------------------------------------------------------------------------

def flagged_rate(flags: np.ndarray, quantile: float, table: dict | None) -> dict:
    """``is_anomaly`` rate vs ``1 - quantile`` (see the module docstring)."""
    m, k = len(flags), int(np.sum(flags))
    if m == 0:
        return _skipped("no scored rows")
    expected = 1.0 - quantile
    out = {"rows": m, "flagged": k, "rate": _round(k / m), "expected_rate": _round(expected),
           "binomial_p": _round(binomial_test(k, m, expected))}
    n = (table or {}).get("n")
    if isinstance(n, int) and n >= 2:
        h = (n - 1) * quantile
        a, b = n - h, h + 1.0
        out.update(calibration_images=n, calibrated_rate=_round(a / (a + b)), p_value=_round(beta_binomial_test(k, m, a, b)))
    else:
        out["p_value"] = out["binomial_p"]
    out["verdict"] = p_verdict(out["p_value"])
    return out


def _knots(table: dict) -> tuple[np.ndarray, np.ndarray]:
    """The stored quantiles (0 < q < 1), sorted: where a percentile is exact."""
    pts = sorted((float(k), float(v)) for k, v in table.items() if k not in ("min", "max", "n"))
    qs = np.array([q for q, _ in pts if 0 < q < 1])
    return qs, 100.0 * qs


def percentile_bins(qs: np.ndarray, min_mass: float = MIN_BIN_MASS) -> np.ndarray:
    """Bin edges in 0..1 from the stored quantiles, merged so that each bin holds ``min_mass``."""
    edges = [0.0]
    for q in qs:
        if q - edges[-1] >= min_mass - 1e-9 and 1.0 - q >= min_mass - 1e-9:
            edges.append(float(q))
    return np.array(edges + [1.0])


def percentile_uniform(percentiles: np.ndarray, table: dict | None) -> dict:
    """``anomaly_percentile`` against uniform, at the stored quantiles (module docstring)."""
    if table is None:
        return _skipped("the checkpoint has no validation quantiles for this score")
    p = np.asarray(percentiles, np.float64)
    m = len(p)
    if m == 0:
        return _skipped("no scored rows")
    qs, at = _knots(table)
    cdf = np.array([np.mean(p <= a + 1e-9) for a in at])
    i = int(np.argmax(np.abs(cdf - qs)))
    d = float(np.abs(cdf - qs)[i])
    n = table.get("n")
    n_eff = m * n / (m + n) if isinstance(n, int) and n > 0 else m
    edges = percentile_bins(qs)
    observed = np.histogram(p / 100.0, bins=edges)[0] / m
    value = psi(observed, np.diff(edges), m, n if isinstance(n, int) else None)
    ks_p = ks_p_value(d, n_eff)
    return {"rows": m, "ks_distance": _round(d), "ks_at_percentile": _round(float(at[i])), "ks_p": _round(ks_p),
            "psi": _round(value), "bins": [_round(100 * e) for e in edges],
            "observed": [_round(x) for x in observed], "ks_verdict": p_verdict(ks_p), "psi_verdict": psi_verdict(value),
            "verdict": worst(p_verdict(ks_p), psi_verdict(value))}


def score_vs_previous(scores: np.ndarray, previous: np.ndarray, previous_url: str) -> dict:
    """``anomaly_score`` against the previous partition's: exact two-sample KS, PSI on its deciles."""
    if len(scores) == 0 or len(previous) == 0:
        return _skipped("no scored rows in one of the partitions")
    d = ks_two_sample(scores, previous)
    n_eff = len(scores) * len(previous) / (len(scores) + len(previous))
    edges = np.unique(np.quantile(previous, np.linspace(0, 1, SCORE_BINS + 1)))
    edges[0], edges[-1] = -np.inf, np.inf
    observed = np.histogram(scores, bins=edges)[0] / len(scores)
    expected = np.histogram(previous, bins=edges)[0] / len(previous)
    value = psi(observed, expected, len(scores), len(previous))
    ks_p = ks_p_value(d, n_eff)
    return {"previous": previous_url, "rows": len(scores), "previous_rows": len(previous), "ks_distance": _round(d),
            "ks_p": _round(ks_p), "psi": _round(value), "ks_verdict": p_verdict(ks_p), "psi_verdict": psi_verdict(value),
            "verdict": worst(p_verdict(ks_p), psi_verdict(value))}


def embedding_shift(mean: np.ndarray, cov: np.ndarray, n: int, reference: dict | None) -> dict:
    """Posterior means' mean and covariance against the validation images' (``embedding_stats``)."""
    if not reference:
        return _skipped("the checkpoint stores no validation embedding statistics (calibrated by an older "
                        "vaepipe: `vaepipe calibrate` adds them)")
    mean0, cov0, n0 = np.asarray(reference["mean"]), np.asarray(reference["cov"]), int(reference["n"])
    if len(mean) != len(mean0):
        return _skipped(f"embeddings have {len(mean)} dimensions, the stored statistics {len(mean0)}")
    t2, p = hotelling_two_sample(mean, cov, n, mean0, cov0, n0)
    if not math.isfinite(p):
        return _skipped(f"{n} rows are too few for a {len(mean)}-dimensional mean test")
    return {"rows": n, "calibration_images": n0, "hotelling_t2": _round(t2), "p_value": _round(p),
            "mahalanobis": _round(mahalanobis(mean, mean0, cov0)), "gaussian_kl": _round(gaussian_kl(mean, cov, mean0, cov0)),
            "spread_ratio": _round(float(np.trace(np.linalg.pinv(cov0, hermitian=True) @ cov)) / len(mean0)),
            "verdict": p_verdict(p)}


# -- the partition ---------------------------------------------------------------------------

class _Rows:
    """The columns drift reads, over every rows file of a partition; embeddings as running sums."""

    def __init__(self) -> None:
        self.scores: list[np.ndarray] = []
        self.percentiles: list[np.ndarray] = []
        self.flags: list[np.ndarray] = []
        self.n, self.total, self.outer = 0, None, None

    def add(self, table: Any) -> None:
        score = table.column("anomaly_score").to_numpy(zero_copy_only=False)
        ok = ~np.isnan(score.astype(np.float64)) if len(score) else np.zeros(0, bool)
        self.scores.append(score[ok].astype(np.float64))
        if "anomaly_percentile" in table.column_names and table.column("anomaly_percentile").null_count == 0:
            self.percentiles.append(table.column("anomaly_percentile").to_numpy(zero_copy_only=False))
        if "is_anomaly" in table.column_names and table.column("is_anomaly").null_count == 0:
            self.flags.append(table.column("is_anomaly").to_numpy(zero_copy_only=False).astype(bool))
        if "embedding" not in table.column_names:
            return
        emb = table.column("embedding").combine_chunks()
        if len(emb):
            x = emb.flatten().to_numpy(zero_copy_only=False).reshape(len(emb), -1).astype(np.float64)
            self.n += len(x)
            self.total = x.sum(0) if self.total is None else self.total + x.sum(0)
            # einsum, not BLAS: a threaded BLAS spinning on a busy worker made this 10x slower (BENCHMARKS.md)
            outer = np.einsum("ij,ik->jk", x, x)
            self.outer = outer if self.outer is None else self.outer + outer

    def embedding_moments(self) -> tuple[np.ndarray, np.ndarray] | None:
        if self.n < 2:
            return None
        mean = self.total / self.n
        return mean, (self.outer - self.n * np.outer(mean, mean)) / (self.n - 1)

    @staticmethod
    def cat(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0, dtype)


def read_rows(partition_url: str, files: list[str], storage_options: StorageOptions = None,
              embeddings: bool = True) -> _Rows:
    """The drift columns of the rows files ``files`` (names) of a partition; ``embeddings=False``
    reads the scores only (the previous partition's)."""
    rows = _Rows()
    wanted = ("anomaly_score", "anomaly_percentile", "is_anomaly") + (("embedding",) if embeddings else ())
    for name in files:
        fs, path = fresh_fs(join(partition_url, name), storage_options)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            cols = [c for c in wanted if c in pf.schema_arrow.names]
            rows.add(pf.read(columns=cols))
    return rows


def previous_partition(out_url: str, run_date: str | None, storage_options: StorageOptions = None) -> str | None:
    """The latest ``dt=`` partition under ``out_url`` before ``run_date`` that has ``_SUCCESS``."""
    if not run_date:
        return None
    fs, path = fresh_fs(out_url, storage_options)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return None
    dates = []
    for e in entries:
        match = _DT.match(e["name"].rstrip("/").rsplit("/", 1)[-1])
        if match and e.get("type") == "directory" and match.group(1) < run_date:
            dates.append(match.group(1))
    for day in sorted(dates, reverse=True):
        url = join(out_url, f"dt={day}")
        fs, path = fresh_fs(join(url, "_SUCCESS"), storage_options)
        if fs.exists(path):
            return url
    return None


def _previous_scores(url: str, context: dict, storage_options: StorageOptions) -> tuple[np.ndarray | None, str]:
    fs, path = fresh_fs(join(url, "_manifest.json"), storage_options)
    with fs.open(path, "rb") as f:
        manifest = json.loads(f.read())
    same = (manifest.get("model_id") == context.get("model_id")
            and manifest.get("calibration") == context.get("calibration")
            and (manifest.get("options") or {}).get("score") == (context.get("options") or {}).get("score"))
    if not same:
        return None, f"{url} was scored with another model, calibration or score"
    rows = read_rows(url, manifest.get("files", []), storage_options, embeddings=False)
    return rows.cat(rows.scores, np.float64), ""


def partition_drift(partition_url: str, files: list[str], context: dict, storage_options: StorageOptions = None
                    ) -> dict:
    """The manifest's ``drift`` section for the partition's rows ``files`` (names)."""
    options = context.get("options") or {}
    reference = context.get("drift_reference") or {}
    table = reference.get("quantiles")
    rows = read_rows(partition_url, files, storage_options)
    scores = rows.cat(rows.scores, np.float64)
    stats: dict[str, dict] = {}
    if len(scores) == 0:
        reason = "no anomaly scores in the partition (no rows, or --score none)"
        stats = {name: _skipped(reason) for name in ("flagged_rate", "percentile_uniform", "score_vs_previous")}
    else:
        flags = rows.cat(rows.flags, bool)
        stats["flagged_rate"] = (flagged_rate(flags, options.get("threshold_quantile", 0.99), table) if len(flags)
                                 else _skipped("is_anomaly is null: the checkpoint has no quantiles for this score"))
        stats["percentile_uniform"] = percentile_uniform(rows.cat(rows.percentiles, np.float64), table)
        previous = previous_partition(context.get("out_url", ""), context.get("run_date"), storage_options)
        if previous is None:
            stats["score_vs_previous"] = _skipped("no earlier dt= partition with _SUCCESS under the output"
                                                  if context.get("run_date") else "no --run-date: no previous partition")
        else:
            prev, why = _previous_scores(previous, context, storage_options)
            stats["score_vs_previous"] = _skipped(why) if prev is None else score_vs_previous(scores, prev, previous)
    moments = rows.embedding_moments()
    stats["embedding_shift"] = (embedding_shift(*moments, rows.n, reference.get("embedding_stats")) if moments
                                else _skipped("fewer than 2 rows"))
    failed = [name for name, s in stats.items() if s["verdict"] == "fail"]
    return {"verdict": worst(*(s["verdict"] for s in stats.values())), "failed": failed,
            "thresholds": {"p_fail": P_FAIL, "p_warn": P_WARN, "psi_warn": PSI_WARN, "psi_fail": PSI_FAIL},
            "computed_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **stats}


def drift_failed(manifest: dict) -> list[str]:
    """Names of the statistics whose verdict is ``fail`` (``vaepipe embed --fail-on-drift``)."""
    return list((manifest.get("drift") or {}).get("failed", []))


def exit_status(manifest: dict) -> int:
    """:data:`DRIFT_EXIT_CODE` when the run asked ``--fail-on-drift`` and a verdict failed, else 0."""
    return DRIFT_EXIT_CODE if (manifest.get("options") or {}).get("fail_on_drift") and drift_failed(manifest) else 0


def format_drift(drift: dict) -> str:
    """One line per statistic, for the end of ``vaepipe embed``."""
    if not drift:
        return "drift: not computed"
    if "error" in drift:
        return f"drift: not computed ({drift['error']})"
    lines = [f"drift: {drift['verdict']}" + (f" (failed: {', '.join(drift['failed'])})" if drift["failed"] else "")]
    for name in ("flagged_rate", "percentile_uniform", "score_vs_previous", "embedding_shift"):
        s = drift.get(name) or {}
        shown = {k: s[k] for k in ("rate", "expected_rate", "p_value", "ks_distance", "ks_p", "psi", "mahalanobis",
                                   "reason") if k in s}
        lines.append(f"  {name}: {s.get('verdict', '?')} " + " ".join(f"{k}={v}" for k, v in shown.items()))
    return "\n".join(lines)
