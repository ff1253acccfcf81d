"""Beam metrics of an embed run: reported by the DoFns, read back from the PipelineResult.

:class:`ShardMetrics` turns each shard's summary into counters and distributions in the
``vaepipe`` namespace, so runner UIs (Dataflow, Flink) show them while the job runs;
:func:`query_metrics` reads them back once the pipeline has finished, for the command line and
the manifest. A runner whose result holds no metrics is said so (``available: false`` with the
reason), never filled in from elsewhere.
"""
from __future__ import annotations

import logging
from typing import Any

from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter

log = logging.getLogger(__name__)

NAMESPACE = "vaepipe"
DEAD_LETTER_PREFIX = "dead_letters."  # + error_type: one counter per kind of failure
COUNTERS = ("shards", "shards_skipped", "images_seen", "rows", "errors", "bytes_read", "heap_trims")
DISTRIBUTIONS = ("shard_images", "shard_decode_ms", "shard_score_ms", "shard_ms")  # per embedded shard


class ShardMetrics:
    """The metrics one shard summary adds (created in a DoFn's constructor, updated in process)."""

    def __init__(self) -> None:
        self.counters = {name: Metrics.counter(NAMESPACE, name) for name in COUNTERS}
        self.distributions = {name: Metrics.distribution(NAMESPACE, name) for name in DISTRIBUTIONS}

    def update(self, summary: dict) -> None:
        c = self.counters
        c["shards"].inc()
        if summary.get("skipped"):  # its work was done by an earlier run: counted, not timed
            c["shards_skipped"].inc()
        for name in ("images_seen", "rows", "errors", "bytes_read", "heap_trims"):
            if summary.get(name):
                c[name].inc(int(summary[name]))
        for etype, n in (summary.get("dead_letters") or {}).items():
            Metrics.counter(NAMESPACE, DEAD_LETTER_PREFIX + etype).inc(int(n))
        if summary.get("skipped"):
            return
        d = self.distributions
        d["shard_images"].update(int(summary.get("images_seen", 0)))
        for name, key in (("shard_decode_ms", "decode_seconds"), ("shard_score_ms", "score_seconds"),
                          ("shard_ms", "seconds")):
            if key in summary:
                d[name].update(int(round(1000 * summary[key])))


def _value(result: Any) -> tuple[Any, str]:
    """A metric's committed value where the runner has one, else the attempted one."""
    try:
        committed = result.committed
    except Exception:  # some runners raise instead of returning None for unsupported committed values
        committed = None
    return (committed, "committed") if committed is not None else (result.attempted, "attempted")


def query_metrics(pipeline_result: Any) -> dict:
    """The ``vaepipe`` metrics of a finished pipeline, summed over steps:
    ``{"available": True, "counters": {...}, "distributions": {name: {count, sum, min, max, mean}}}``,
    or ``{"available": False, "reason": ...}`` when the runner returns none."""
    runner = type(pipeline_result).__name__
    try:
        found = pipeline_result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    except Exception as exc:  # NotImplementedError and friends: runners without metrics support
        return {"available": False, "reason": f"{runner}.metrics() failed: {type(exc).__name__}: {exc}"[:300]}
    counters: dict[str, int] = {}
    distributions: dict[str, dict] = {}
    kinds = set()
    for r in found.get("counters", []):
        value, kind = _value(r)
        if value is not None:
            kinds.add(kind)
            counters[r.key.metric.name] = counters.get(r.key.metric.name, 0) + int(value)
    for r in found.get("distributions", []):
        value, kind = _value(r)
        if value is None or not value.count:
            continue
        kinds.add(kind)
        d = distributions.setdefault(r.key.metric.name, {"count": 0, "sum": 0, "min": value.min, "max": value.max})
        d["count"] += value.count
        d["sum"] += value.sum
        d["min"], d["max"] = min(d["min"], value.min), max(d["max"], value.max)
    for d in distributions.values():
        d["mean"] = round(d["sum"] / d["count"], 3)
    if not counters and not distributions:
        return {"available": False, "reason": f"the runner's result ({runner}) returned no vaepipe metrics"}
    return {"available": True, "values": "committed" if kinds == {"committed"} else "attempted",
            "counters": dict(sorted(counters.items())), "distributions": dict(sorted(distributions.items()))}


def format_metrics(metrics: dict) -> str:
    """One line per metric, for the end of ``vaepipe embed``."""
    if not metrics.get("available"):
        return f"metrics: none ({metrics.get('reason', 'not reported')})"
    lines = [f"metrics ({metrics['values']}):"]
    lines += [f"  {name} = {value:,}" for name, value in metrics["counters"].items()]
    lines += [f"  {name}: n={d['count']} mean={d['mean']:,} min={d['min']:,} max={d['max']:,}"
              for name, d in metrics["distributions"].items()]
    return "\n".join(lines)
