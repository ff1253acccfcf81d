"""pipeline: shard reading/decoding, the Apache Beam embedding + anomaly-scoring pipeline, and the
vector index of its output.

Package-level API (imported on first use, so ``import pipeline`` stays light):
``build_index(latents_url, index_url, ...)`` and ``open_index(index_url, ...).search(vectors | images, k)``
(:mod:`pipeline.index`).
"""
from __future__ import annotations

from vae_model.exports import lazy_exports

_EXPORTS = {"build_index": "index", "open_index": "index"}
__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
