"""Read and verify a checkpoint's header and content hash without importing torch.

A safetensors file is an 8-byte little-endian header length, a JSON header (each tensor's
dtype, shape and byte range, plus string metadata under ``__metadata__``) and the raw tensor
bytes. Everything :mod:`vae_model.checkpoint` verifies before it builds a model — format
version, config, metadata and the ``vaepipe.model_id`` content hash — needs only the header and
the raw bytes, so a process that only launches work (the Beam driver) can check a checkpoint
in full without paying for a torch import (about 1 s) or rebuilding the model.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from .config import VAEConfig
from .errors import CheckpointError, ConfigError, StorageError
from .storage import StorageOptions, read_bytes

FORMAT_VERSION = "1"

# safetensors dtype code -> (torch dtype name as hashed by the model_id, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("torch.float64", 8), "F32": ("torch.float32", 4), "F16": ("torch.float16", 2),
    "BF16": ("torch.bfloat16", 2), "I64": ("torch.int64", 8), "I32": ("torch.int32", 4),
    "I16": ("torch.int16", 2), "I8": ("torch.int8", 1), "U8": ("torch.uint8", 1), "BOOL": ("torch.bool", 1),
}
MODEL_ID_PREFIX = b"vaepipe-model-v1\0"


@dataclass
class CheckpointInfo:
    """A verified checkpoint's description: everything but the weights."""

    config: VAEConfig
    meta: dict[str, Any] = field(default_factory=dict)
    model_id: str = ""

    @property
    def score_quantiles(self) -> dict[str, dict[str, float]]:
        """Validation quantiles per anomaly score name: {score: {"0.5": v, "0.99": v, ...}}."""
        return self.meta.get("score_quantiles", {})


def model_id_of(config_json: str, tensors: list[tuple[str, str, tuple[int, ...], bytes | memoryview]]) -> str:
    """The content hash: config JSON, then every tensor's name, dtype, shape and bytes, sorted by name."""
    h = hashlib.sha256()
    h.update(MODEL_ID_PREFIX)
    h.update(config_json.encode())
    for name, dtype, shape, data in sorted(tensors, key=lambda t: t[0]):
        h.update(f"\0{name}\0{dtype}\0{shape}\0".encode())
        h.update(data)
    return h.hexdigest()[:32]


def _corrupt(source: str, why: str) -> CheckpointError:
    return CheckpointError(f"{source}: corrupt or truncated checkpoint ({why})")


def _tensors(header: dict, body: memoryview, source: str) -> list[tuple[str, str, tuple[int, ...], memoryview]]:
    out = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise _corrupt(source, f"bad header entry for tensor {name!r}") from None
        if code not in DTYPES:
            raise _corrupt(source, f"tensor {name!r} has unsupported dtype {code}")
        dtype, itemsize = DTYPES[code]
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= len(body)) \
                or end - begin != math.prod(shape) * itemsize:
            raise _corrupt(source, f"tensor {name!r} does not fit the file")
        out.append((name, dtype, shape, body[begin:end]))
    return out


def parse_checkpoint(data: bytes, source: str = "<bytes>") -> CheckpointInfo:
    """Verify checkpoint bytes (format, content hash, config) and describe them.

    Raises:
        CheckpointError: truncated or corrupt file, not a vaepipe checkpoint, unsupported format
            version, content hash mismatch (modified or damaged weights), incompatible config.
    """
    if len(data) < 8:
        raise CheckpointError(f"{source}: not a vaepipe checkpoint (file is {len(data)} bytes; truncated?)")
    header_len = int.from_bytes(data[:8], "little")
    if header_len <= 0 or 8 + header_len > len(data):
        raise CheckpointError(f"{source}: truncated or not a safetensors checkpoint (header says {header_len} bytes, "
                              f"file has {len(data)})")
    try:
        header = json.loads(bytes(data[8:8 + header_len]))
    except (ValueError, UnicodeDecodeError) as exc:
        raise _corrupt(source, f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _corrupt(source, "header is not a JSON object")
    meta_hdr = header.get("__metadata__") or {}
    fmt = meta_hdr.get("vaepipe.format")
    if fmt is None:
        raise CheckpointError(f"{source}: a safetensors file, but not a vaepipe checkpoint (no vaepipe.format)")
    if fmt != FORMAT_VERSION:
        raise CheckpointError(f"{source}: checkpoint format {fmt} is not supported by this vaepipe "
                              f"(supports {FORMAT_VERSION}); upgrade vaepipe")
    body = memoryview(data)[8 + header_len:]
    config_json = meta_hdr.get("vaepipe.config", "")
    expected = meta_hdr.get("vaepipe.model_id", "")
    actual = model_id_of(config_json, _tensors(header, body, source))
    if actual != expected:
        raise CheckpointError(f"{source}: content hash mismatch (model_id {expected or '?'} recorded, {actual} "
                              "computed): the checkpoint was modified or corrupted; retrain or restore it")
    try:
        config = VAEConfig.from_dict(json.loads(config_json))
        meta = json.loads(meta_hdr.get("vaepipe.meta", "{}"))
    except (ConfigError, TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{source}: incompatible checkpoint config ({exc})") from None
    return CheckpointInfo(config=config, meta=meta, model_id=expected)


def read_checkpoint_bytes(url: str, storage_options: StorageOptions = None) -> bytes:
    try:
        return read_bytes(url, storage_options)
    except StorageError as exc:
        raise CheckpointError(f"cannot read checkpoint {exc}") from None


def inspect_checkpoint(url: str, storage_options: StorageOptions = None) -> CheckpointInfo:
    """Read and verify a checkpoint from any fsspec URL, without torch and without building the model."""
    return parse_checkpoint(read_checkpoint_bytes(url, storage_options), source=url)
