"""Read and verify a checkpoint's header and content hash without importing torch.

A safetensors file is an 8-byte little-endian header length, a JSON header (each tensor's
dtype, shape and byte range, plus string metadata under ``__metadata__``) and the raw tensor
bytes. Everything :mod:`vae_model.checkpoint` verifies before it builds a model — format
version, config, metadata and the ``vaepipe.model_id`` content hash — needs only the header and
the raw bytes, so a process that only launches work (the Beam driver) can check a checkpoint
in full without paying for a torch import (about 1 s) or rebuilding the model.

Two hashes seal what changes an output row: ``vaepipe.model_id`` the config and weights,
``vaepipe.calibration_id`` (:func:`calibration_id`) the score statistics in ``vaepipe.meta``
(quantiles, their iwae_k, the typicality reference, the validation embeddings' mean and
covariance: drift's reference). Both are recomputed on every read and a mismatch is refused.
They are checksums against edits and damage, not signatures: whoever can
rewrite the file can recompute them. Statistics without a ``calibration_id`` (checkpoints of
earlier versions) are refused too, since deleting the field would otherwise pass any edit;
``vaepipe calibrate`` refits and seals them. Every header field is checked against its schema
here, so a malformed checkpoint is one line on the driver, never a crash in a worker.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from .config import VAEConfig
from .errors import CheckpointError, ConfigError, StorageError
from .storage import StorageOptions, read_bytes

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"
# A vaepipe header is a config and score statistics: kilobytes, a few MB with a large typicality
# reference. Anything much bigger is not ours, and parsing it would cost the driver its memory.
MAX_HEADER_BYTES = 64 << 20
# The metadata besides the weights that changes a row: percentiles and is_anomaly come from the
# quantiles, the typicality score from its reference. Sealed by vaepipe.calibration_id.
CALIBRATION_FIELDS = ("score_quantiles", "score_quantiles_iwae_k", "typicality")
# Sealed as well when present, left out of the hash when absent, so that the ids of checkpoints
# calibrated before they existed do not change: ``embedding_stats`` (pipeline.drift's reference).
OPTIONAL_CALIBRATION_FIELDS = ("embedding_stats",)
RECALIBRATE = "run `vaepipe calibrate CHECKPOINT HELDOUT_DATA_URL` to refit them"

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

    calibration_id: str = ""  # verified calibration_id(meta); "" when the checkpoint has no statistics

    @property
    def score_quantiles(self) -> dict[str, dict[str, float]]:
        """Validation quantiles per anomaly score name: {score: {"0.5": v, "0.99": v, ...}}."""
        return self.meta.get("score_quantiles", {})


def calibration_id(meta: dict) -> str:
    """Content id of a checkpoint's score statistics (:data:`CALIBRATION_FIELDS`); "" if none.

    The one definition: the writer stores it as ``vaepipe.calibration_id``, :func:`parse_checkpoint`
    recomputes it, and embed outputs record it as ``vaepipe.calibration`` (a rerun after a
    recalibration rescores instead of skipping)."""
    stats = {k: meta.get(k) for k in CALIBRATION_FIELDS}
    if not any(stats.values()) and not any(meta.get(k) is not None for k in OPTIONAL_CALIBRATION_FIELDS):
        return ""
    stats.update({k: meta[k] for k in OPTIONAL_CALIBRATION_FIELDS if meta.get(k) is not None})
    return hashlib.sha256(json.dumps(stats, sort_keys=True).encode()).hexdigest()[:16]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _quantile_table(name: str, table: Any) -> None:
    """A table of :func:`vae_model.calibration.quantile_table`: {"0.5": v, ..., "min": v, "max": v, "n": n}."""
    if not isinstance(table, dict):
        raise ConfigError(f"{name} must be a JSON object {{quantile: score}}, not {type(table).__name__}")
    quantiles = 0
    for key, v in table.items():
        if key == "n":
            if not (_is_int(v) and v >= 0):
                raise ConfigError(f"{name}.n={repr(v)[:40]} must be a count")
            continue
        if key not in ("min", "max"):
            try:
                q = float(key)
            except ValueError:
                q = math.nan
            if not 0 <= q <= 1:
                raise ConfigError(f"{name}: key {key[:40]!r} is not a quantile in [0, 1], min, max or n")
            quantiles += 1
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"{name}.{key}={repr(v)[:40]} must be a finite number")
    if not quantiles:
        raise ConfigError(f"{name} has no quantiles")


def _embedding_stats(stats: Any, dim: int) -> None:
    """:func:`vae_model.calibration.embedding_stats`: {"n": count >= 2, "mean": [dim], "cov": [[dim x dim]]}."""
    if not isinstance(stats, dict):
        raise ConfigError(f"embedding_stats must be a JSON object, not {type(stats).__name__}")
    n = stats.get("n")
    if not (_is_int(n) and n >= 2):
        raise ConfigError(f"embedding_stats.n={repr(n)[:40]} must be a count >= 2")
    for key, shape in (("mean", (dim,)), ("cov", (dim, dim))):
        value = stats.get(key)
        rows = value if len(shape) == 2 and isinstance(value, list) else [value]
        ok = (isinstance(value, list) and len(value) == shape[0]
              and all(isinstance(r, list) and len(r) == dim and all(
                  not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) for v in r)
                  for r in rows))
        if not ok:
            raise ConfigError(f"embedding_stats.{key} must be a {' x '.join(map(str, shape))} array of finite numbers")


def validate_meta(meta: Any, config: VAEConfig) -> None:
    """Check the metadata fields scoring reads (:data:`CALIBRATION_FIELDS`) and the calibration
    record; raises a ConfigError naming the field. Other fields are descriptive and free-form."""
    from .typicality import TypicalityReference  # numpy only; not needed by callers that skip this

    if not isinstance(meta, dict):
        raise ConfigError(f"vaepipe.meta must be a JSON object, not {type(meta).__name__}")
    quantiles = meta.get("score_quantiles")
    if quantiles is not None:
        if not isinstance(quantiles, dict):
            raise ConfigError(f"score_quantiles must be a JSON object {{score: table}}, not {type(quantiles).__name__}")
        for score, table in quantiles.items():
            _quantile_table(f"score_quantiles.{score[:40]}", table)
    k = meta.get("score_quantiles_iwae_k")
    if k is not None and not (_is_int(k) and k >= 1):
        raise ConfigError(f"score_quantiles_iwae_k={repr(k)[:40]} must be an integer >= 1")
    if meta.get("typicality") is not None:
        TypicalityReference.from_dict(meta["typicality"], latent_dim=config.latent_dim)
    if meta.get("embedding_stats") is not None:
        _embedding_stats(meta["embedding_stats"], config.latent_dim)
    if meta.get("calibration") is not None and not isinstance(meta["calibration"], dict):
        raise ConfigError(f"calibration must be a JSON object, not {type(meta['calibration']).__name__}")


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


def parse_checkpoint(data: bytes, source: str = "<bytes>", verify_calibration: bool = True) -> CheckpointInfo:
    """Verify checkpoint bytes (format, header schema, content hash, config, calibration hash)
    and describe them.

    ``verify_calibration=False`` is for recalibrating: score statistics that are unsealed or
    fail their hash are dropped from ``meta`` (with a warning) instead of refused.

    Raises:
        CheckpointError: truncated or corrupt file, not a vaepipe checkpoint, unsupported format
            version, content hash mismatch (modified or damaged weights), incompatible config,
            metadata of the wrong type or shape, modified or unsealed score statistics.
    """
    header, header_len = _read_header(data, source)
    meta_hdr = _string_metadata(header, source)
    body = memoryview(data)[8 + header_len:]
    config_json = meta_hdr.get("vaepipe.config", "")
    expected = meta_hdr.get("vaepipe.model_id", "")
    actual = model_id_of(config_json, _tensors(header, body, source))
    if actual != expected:
        raise CheckpointError(f"{source}: content hash mismatch (model_id {expected or '?'} recorded, {actual} "
                              "computed): the checkpoint was modified or corrupted; retrain or restore it")
    try:
        config = VAEConfig.from_dict(json.loads(config_json))
    except (ConfigError, RecursionError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{source}: incompatible checkpoint config ({str(exc)[:300]})") from None
    try:
        meta = json.loads(meta_hdr.get("vaepipe.meta", "{}"))
    except (RecursionError, json.JSONDecodeError) as exc:
        raise _corrupt(source, f"vaepipe.meta is not JSON: {str(exc)[:200]}") from None
    if not isinstance(meta, dict):
        raise _corrupt(source, f"vaepipe.meta is a {type(meta).__name__}, not a JSON object")
    meta, cal_id = _verified_calibration(meta, meta_hdr.get("vaepipe.calibration_id"), source, verify_calibration)
    try:
        validate_meta(meta, config)
    except ConfigError as exc:
        raise CheckpointError(f"{source}: invalid checkpoint metadata: {str(exc)[:300]}") from None
    return CheckpointInfo(config=config, meta=meta, model_id=expected, calibration_id=cal_id)


def _read_header(data: bytes, source: str) -> tuple[dict, int]:
    """The safetensors JSON header (size-capped) and its length in bytes."""
    if len(data) < 8:
        raise CheckpointError(f"{source}: not a vaepipe checkpoint (file is {len(data)} bytes; truncated?)")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > MAX_HEADER_BYTES and 8 + header_len <= len(data):
        raise CheckpointError(f"{source}: checkpoint header is {header_len / 2**20:.0f} MB, over the "
                              f"{MAX_HEADER_BYTES >> 20} MB limit: not a vaepipe checkpoint, or its metadata was inflated")
    if header_len <= 0 or 8 + header_len > len(data):
        raise CheckpointError(f"{source}: truncated or not a safetensors checkpoint (header says {header_len} bytes, "
                              f"file has {len(data)})")
    try:
        header = json.loads(bytes(data[8:8 + header_len]))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise _corrupt(source, f"header is not JSON: {str(exc)[:200]}") from None
    if not isinstance(header, dict):
        raise _corrupt(source, "header is not a JSON object")
    return header, header_len


def _string_metadata(header: dict, source: str) -> dict[str, str]:
    """The header's ``__metadata__`` (strings only) of a supported vaepipe format version."""
    meta_hdr = header.get("__metadata__")
    if meta_hdr is None:
        meta_hdr = {}
    if not isinstance(meta_hdr, dict):
        raise _corrupt(source, f"__metadata__ is a {type(meta_hdr).__name__}, not a JSON object")
    bad = next((k for k, v in meta_hdr.items() if not isinstance(v, str)), None)
    if bad is not None:
        raise _corrupt(source, f"__metadata__ value {bad[:40]!r} must be a string, not {type(meta_hdr[bad]).__name__}")
    fmt = meta_hdr.get("vaepipe.format")
    if fmt is None:
        raise CheckpointError(f"{source}: a safetensors file, but not a vaepipe checkpoint (no vaepipe.format)")
    if fmt != FORMAT_VERSION:
        raise CheckpointError(f"{source}: checkpoint format {fmt} is not supported by this vaepipe "
                              f"(supports {FORMAT_VERSION}); upgrade vaepipe")
    return meta_hdr


def _verified_calibration(meta: dict, recorded: str | None, source: str, verify: bool) -> tuple[dict, str]:
    """(meta, calibration_id) once the statistics match their recorded hash; see :func:`parse_checkpoint`."""
    actual = calibration_id(meta)
    if recorded == actual or (recorded is None and actual == ""):
        return meta, actual
    if recorded is None:
        why = (f"{source}: score statistics without a vaepipe.calibration_id (written by an older vaepipe, or "
               f"the field was removed): they cannot be verified; {RECALIBRATE}")
    else:
        why = (f"{source}: calibration hash mismatch (calibration_id {recorded or '?'} recorded, {actual or 'none'} "
               f"computed): the score statistics were modified; {RECALIBRATE}")
    if verify:
        raise CheckpointError(why)
    log.warning("%s; dropping them", why.split(";")[0])
    dropped = (*CALIBRATION_FIELDS, *OPTIONAL_CALIBRATION_FIELDS, "calibration")
    return {k: v for k, v in meta.items() if k not in dropped}, ""


def read_checkpoint_bytes(url: str, storage_options: StorageOptions = None) -> bytes:
    try:
        return read_bytes(url, storage_options)
    except StorageError as exc:
        raise CheckpointError(f"cannot read checkpoint {exc}") from None


def inspect_checkpoint(url: str, storage_options: StorageOptions = None) -> CheckpointInfo:
    """Read and verify a checkpoint from any fsspec URL, without torch and without building the model."""
    return parse_checkpoint(read_checkpoint_bytes(url, storage_options), source=url)
