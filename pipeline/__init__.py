"""pipeline: shard reading/decoding, the Apache Beam embedding + anomaly-scoring pipeline, and the
vector index of its output.

Package-level API (imported on first use, so ``import pipeline`` stays light):
``build_index(latents_url, index_url, ...)`` and ``open_index(index_url, ...).search(vectors | images, k)``
(:mod:`pipeline.index`).
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"build_index": "index", "open_index": "index"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
