"""The run report's plots (matplotlib, Agg backend), each returned as an inline PNG data URI.

Every figure takes tonight's :class:`~pipeline.report_data.RunData` and, with ``--compare``,
the previous night's, drawn in the same axes.
"""
from __future__ import annotations

import base64
import datetime as dt
import io
from collections import Counter

import matplotlib

matplotlib.use("Agg")  # no display: the driver, a CI box, a scheduler
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.report_data import RunData, column, validation_density  # noqa: E402

TONIGHT, PREVIOUS, VALIDATION = "#1f6feb", "#9a6700", "#57606a"
PERCENTILE_BINS = 20
SIZE = (6.4, 3.4)


def _uri(fig: plt.Figure) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _finite(values: np.ndarray) -> np.ndarray:
    return values[np.isfinite(values)]


def score_histogram(run: RunData, prev: RunData | None = None) -> str:
    """Tonight's anomaly scores (density) against the validation density of the checkpoint."""
    fig, ax = plt.subplots(figsize=SIZE)
    scores = _finite(column(run.rows, "anomaly_score"))
    prev_scores = _finite(column(prev.rows, "anomaly_score")) if prev is not None else np.array([])
    edges_v = dens_v = None
    if run.validation:
        edges_v, dens_v = validation_density(run.validation)
    pool = np.concatenate([scores, prev_scores] + ([edges_v] if edges_v is not None else []))
    if len(pool):
        lo, hi = np.percentile(pool, [0.5, 99.5]) if len(pool) > 50 else (pool.min(), pool.max())
        hi = hi if hi > lo else lo + 1.0
        bins = np.linspace(lo, hi, 41)
        if len(scores):
            ax.hist(np.clip(scores, lo, hi), bins=bins, density=True, alpha=0.55, color=TONIGHT,
                    label=f"tonight ({len(scores):,})")
        if len(prev_scores):
            ax.hist(np.clip(prev_scores, lo, hi), bins=bins, density=True, histtype="step", lw=1.6,
                    color=PREVIOUS, label=f"previous ({len(prev_scores):,})")
    if edges_v is not None:
        ax.stairs(dens_v, edges_v, color=VALIDATION, lw=1.8, ls="--",
                  label=f"validation (from {int(run.validation.get('n', 0)):,} stored quantiles)")
        q = run.threshold_quantile
        if q is not None:
            from vae_model.calibration import threshold_for

            t = threshold_for(run.validation, q)
            ax.axvline(t, color="#cf222e", lw=1.2)
            ax.annotate(f"threshold q={q:g}", (t, 0.95), xycoords=("data", "axes fraction"), color="#cf222e",
                        fontsize=8, ha="right", rotation=90, va="top")
    ax.set_xlabel(f"anomaly_score ({run.score}); edges clipped to the 0.5-99.5% range")
    ax.set_ylabel("density")
    ax.set_title("Anomaly scores vs the checkpoint's validation images")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _uri(fig)


def percentile_histogram(run: RunData, prev: RunData | None = None) -> str:
    """anomaly_percentile in 20 bins: flat at n/20 when tonight looks like the validation images."""
    fig, ax = plt.subplots(figsize=SIZE)
    bins = np.linspace(0, 100, PERCENTILE_BINS + 1)
    pct = _finite(column(run.rows, "anomaly_percentile"))
    ax.hist(pct, bins=bins, color=TONIGHT, alpha=0.55, weights=np.full(len(pct), 100 / max(len(pct), 1)),
            label="tonight")
    if prev is not None:
        pp = _finite(column(prev.rows, "anomaly_percentile"))
        ax.hist(pp, bins=bins, histtype="step", lw=1.6, color=PREVIOUS,
                weights=np.full(len(pp), 100 / max(len(pp), 1)), label="previous")
    ax.axhline(100 / PERCENTILE_BINS, color=VALIDATION, ls="--", lw=1.5, label="no drift (flat)")
    ax.set_xlabel("anomaly_percentile (among validation images)")
    ax.set_ylabel("% of rows")
    ax.set_title("Percentiles: flat when nothing drifted")
    ax.legend(fontsize=8)
    return _uri(fig)


def _timeline(run: RunData) -> list[tuple[float, float, float, object]]:
    """(start s, seconds, img/s, pid) per shard that was worked on, from the run's start."""
    m = run.manifest
    try:
        t0 = dt.datetime.fromisoformat(m["started_at"])
    except (KeyError, ValueError):
        return []
    out = []
    for s in m.get("shards", []):
        if s.get("skipped") or not s.get("started_at") or not s.get("seconds"):
            continue
        start = (dt.datetime.fromisoformat(s["started_at"]) - t0).total_seconds()
        out.append((start, float(s["seconds"]), s["images_seen"] / float(s["seconds"]), s.get("pid")))
    return out


def throughput(run: RunData, prev: RunData | None = None) -> str:
    """Each shard as a segment from its start to its end, at its images/s; one colour per worker."""
    fig, ax = plt.subplots(figsize=SIZE)
    for data, label, style in ((run, "tonight", "-"), (prev, "previous", ":")):
        if data is None:
            continue
        tl = _timeline(data)
        pids = {p: i for i, p in enumerate(sorted({str(t[3]) for t in tl}))}
        cmap = plt.get_cmap("tab10")
        for start, secs, rate, pid in tl:
            colour = cmap(pids[str(pid)] % 10) if label == "tonight" else PREVIOUS
            ax.plot([start, start + secs], [rate, rate], style, color=colour, lw=3, solid_capstyle="butt")
        ax.plot([], [], style, color=TONIGHT if label == "tonight" else PREVIOUS, lw=3,
                label=f"{label}: {len(tl)} shards, {len(pids)} workers")
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel("images/s (per shard)")
    ax.set_ylim(bottom=0)
    ax.set_title("Per-shard throughput over time (colour: worker process)")
    ax.legend(fontsize=8)
    return _uri(fig)


def dead_letters_by_type(run: RunData, prev: RunData | None = None) -> str:
    """Dead letters per error_type (tonight, and the previous night beside it)."""
    now = Counter(run.errors.column("error_type").to_pylist())
    before = Counter(prev.errors.column("error_type").to_pylist()) if prev is not None else Counter()
    types = sorted(set(now) | set(before), key=lambda t: (-now[t], str(t)))
    fig, ax = plt.subplots(figsize=(SIZE[0], max(1.8, 0.9 + 0.35 * len(types))))
    y = np.arange(len(types))
    h = 0.4 if prev is not None else 0.7
    ax.barh(y, [now[t] for t in types], height=h, color=TONIGHT, label="tonight")
    if prev is not None:
        ax.barh(y + h, [before[t] for t in types], height=h, color=PREVIOUS, label="previous")
    ax.set_yticks(y + (h / 2 if prev is not None else 0), [str(t) for t in types])
    ax.invert_yaxis()
    ax.set_xlabel("dead letters")
    ax.set_title("Dead letters by error type")
    if not types:
        ax.text(0.5, 0.5, "no dead letters", ha="center", va="center", transform=ax.transAxes, color=VALIDATION)
        ax.set_axis_off()
    elif prev is not None:
        ax.legend(fontsize=8)
    return _uri(fig)


FIGURES = (("Anomaly scores", score_histogram), ("Percentiles", percentile_histogram),
           ("Throughput", throughput), ("Dead letters", dead_letters_by_type))
