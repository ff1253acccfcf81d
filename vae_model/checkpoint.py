"""Self-describing checkpoints: one safetensors file at any fsspec URL.

Layout: the safetensors header's string metadata holds
  ``vaepipe.format``   format version ("1"),
  ``vaepipe.config``   the :class:`VAEConfig` as JSON,
  ``vaepipe.meta``     training metadata as JSON (data URL + fingerprint, epochs, steps, validation
                       ELBO, validation score quantiles, package version, created_at, ...),
  ``vaepipe.model_id`` sha256 over the config JSON and every tensor's name, dtype, shape and bytes,
  ``vaepipe.calibration_id`` sha256 over the score statistics in the meta (quantiles, typicality
                       reference: what changes a row besides the weights); "" when there are none.
Loading never unpickles anything; both hashes are recomputed and a mismatch is refused, and the
header is checked against its schema (:mod:`vae_model.checkpoint_header` does those checks
without torch). Every write seals the statistics it carries. The file is written in one atomic
step (temp file + rename locally, a single PUT on object stores).
"""
from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .checkpoint_header import (CALIBRATION_FIELDS, FORMAT_VERSION, CheckpointInfo, calibration_id, model_id_of,
                                parse_checkpoint, read_checkpoint_bytes, validate_meta)
from .errors import CheckpointError
from .model import VAE
from .storage import StorageOptions, atomic_write_bytes


@dataclass
class Checkpoint(CheckpointInfo):
    """A loaded checkpoint: the rebuilt model plus everything saved beside it."""

    model: VAE = field(default=None, kw_only=True)  # type: ignore[assignment]  (always set by from_bytes)


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("vaepipe")
    except Exception:  # not installed as a distribution (e.g. running from a source tree)
        return "0+unknown"


def _state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Save the uncompiled module's weights: torch.compile prefixes keys with "_orig_mod.".
    sd = getattr(model, "_orig_mod", model).state_dict()
    return {k.removeprefix("_orig_mod."): v.detach().to("cpu").contiguous() for k, v in sd.items()}


def compute_model_id(config_json: str, tensors: dict[str, torch.Tensor]) -> str:
    """The content hash of a state dict (the same as :func:`checkpoint_header.model_id_of` on its file)."""
    def raw(t: torch.Tensor) -> bytes:
        return t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes()

    return model_id_of(config_json, [(name, str(t.dtype), tuple(t.shape), raw(t)) for name, t in tensors.items()])


def to_bytes(model: VAE, meta: dict[str, Any] | None = None) -> tuple[bytes, str]:
    """Serialise a model and its metadata; returns (file bytes, model_id).

    Raises:
        ConfigError: ``meta`` holds statistics a reader would refuse (see
            :func:`checkpoint_header.validate_meta`); nothing is written.
    """
    tensors = _state_dict(model)
    config_json = json.dumps(model.cfg.to_dict(), sort_keys=True)
    model_id = compute_model_id(config_json, tensors)
    meta = dict(meta or {})
    meta.setdefault("package_version", package_version())
    meta.setdefault("created_at", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    meta_json = json.dumps(meta, sort_keys=True, default=str)
    stored = json.loads(meta_json)  # hash and check what a reader will parse, not the Python objects
    validate_meta(stored, model.cfg)
    header = {
        "vaepipe.format": FORMAT_VERSION,
        "vaepipe.config": config_json,
        "vaepipe.meta": meta_json,
        "vaepipe.model_id": model_id,
        "vaepipe.calibration_id": calibration_id(stored),
    }
    return st_save(tensors, metadata=header), model_id


def save_checkpoint(model: VAE, url: str, meta: dict[str, Any] | None = None,
                    storage_options: StorageOptions = None) -> str:
    """Write ``model`` (+ ``meta``) to ``url`` atomically; returns the model_id."""
    data, model_id = to_bytes(model, meta)
    atomic_write_bytes(url, data, storage_options)
    return model_id


def from_bytes(data: bytes, source: str = "<bytes>", map_location: str | torch.device = "cpu",
               verify_calibration: bool = True) -> Checkpoint:
    """Parse and verify checkpoint bytes (see module docstring), then rebuild the model.
    ``verify_calibration=False``: see :func:`checkpoint_header.parse_checkpoint` (recalibration)."""
    info = parse_checkpoint(data, source, verify_calibration)
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError) as exc:
        raise CheckpointError(f"{source}: corrupt or truncated checkpoint ({str(exc).splitlines()[0]})") from None
    model = VAE(info.config)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{source}: weights do not match the config "
                              f"({str(exc).splitlines()[0]}); incompatible vaepipe version?") from None
    model.to(map_location).eval()
    return Checkpoint(model=model, config=info.config, meta=info.meta, model_id=info.model_id,
                      calibration_id=info.calibration_id)


def load_checkpoint(url: str, storage_options: StorageOptions = None,
                    map_location: str | torch.device = "cpu", verify_calibration: bool = True) -> Checkpoint:
    """Read and verify a checkpoint from any fsspec URL."""
    return from_bytes(read_checkpoint_bytes(url, storage_options), source=url, map_location=map_location,
                      verify_calibration=verify_calibration)


def update_meta(url: str, updates: dict[str, Any], storage_options: StorageOptions = None) -> str:
    """Rewrite a checkpoint with extra metadata (weights unchanged, so the model_id is too).

    Updates that replace every score statistic may rewrite a checkpoint whose statistics fail
    verification (that is recalibrating); any other update needs them intact."""
    ckpt = load_checkpoint(url, storage_options, verify_calibration=not set(CALIBRATION_FIELDS) <= set(updates))
    meta = {**ckpt.meta, **updates}
    return save_checkpoint(ckpt.model, url, meta, storage_options)
