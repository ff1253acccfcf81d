"""Calibration: fit a checkpoint's score statistics on held-out in-distribution images.

What it stores in the checkpoint's metadata (the weights, hence the model_id, are unchanged):
  ``score_quantiles``  quantiles of every score, for ``anomaly_percentile`` / ``is_anomaly``
  ``typicality``       the reference of the ``typicality`` score: densities, each statistic's tail
                       model, the combination rule and its calibration (vae_model.typicality)
  ``embedding_stats``  count, mean and covariance of the images' posterior means (embed's drift check)
  ``calibration``      where the images came from, how many, and a content id of the above
and seals the statistics with ``vaepipe.calibration_id`` (vae_model.checkpoint_header).

Training calls it on its validation split at the end. ``vaepipe calibrate`` runs it again on
other held-out images: more of them (the typicality densities sharpen with more points), or
fresher ones when the normal data drifts, or statistics that a reader refuses (unsealed ones of
an older vaepipe, or edited ones): those are discarded and refitted. Pipeline outputs record the
calibration id, so a rerun after a recalibration rescores instead of skipping.
"""
from __future__ import annotations

import datetime as _dt

import torch

from jobs.data import ShardImageDataset, list_specs, load_tensor
from pipeline.options import trained_resize
from vae_model.combine import DEFAULT_RULE
from vae_model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from vae_model.device import pick_device
from vae_model.errors import ConfigError, VaePipeError
from vae_model.scoring import ScoreOptions, calibration_id, fit_reference
from vae_model.storage import StorageOptions

MIN_IMAGES = 32


def store_calibration(checkpoint_url: str, images: torch.Tensor, source: str, iwae_k: int = 16, seed: int = 0,
                      device: torch.device | str = "cpu", storage_options: StorageOptions = None,
                      ckpt: Checkpoint | None = None, out_url: str | None = None, rule: str = DEFAULT_RULE,
                      uses: tuple[str, ...] | None = None) -> dict:
    """Fit score quantiles + typicality reference on ``images`` (uint8 (N, C, H, W)) and write
    the checkpoint with them, in one atomic step, to ``out_url`` (default: over
    ``checkpoint_url``; ``ckpt``: the checkpoint already loaded from there). Nothing is written
    when fitting fails. ``rule``, ``uses``: how the typicality score combines which of
    its statistics' p-values (vae_model.combine.RULES; vae_model.typicality.STATISTICS). Returns the ``calibration`` record."""
    if len(images) < MIN_IMAGES:
        raise ConfigError(f"calibration needs at least {MIN_IMAGES} held-out images, got {len(images)} from {source}")
    if isinstance(iwae_k, bool) or not isinstance(iwae_k, int) or iwae_k < 1:
        raise ConfigError(f"--iwae-k {iwae_k!r}: the iwae score's quantiles need an integer k >= 1")
    ckpt = ckpt or load_checkpoint(checkpoint_url, storage_options, map_location=device, verify_calibration=False)
    try:
        reference, tables, embeddings = fit_reference(ckpt.model, images, ScoreOptions(score="elbo", iwae_k=iwae_k, seed=seed),
                                                      device, rule=rule, uses=uses)
    except VaePipeError:
        raise
    except ValueError as exc:  # too few or degenerate images (vae_model.typicality)
        raise ConfigError(f"calibration on {source} failed: {exc}") from None
    updates = {"score_quantiles": tables, "score_quantiles_iwae_k": iwae_k, "typicality": reference,
               "embedding_stats": embeddings}
    record = {"data_url": source, "images": int(len(images)), "iwae_k": iwae_k, "seed": seed,
              "at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "id": calibration_id(updates)}
    meta = {**ckpt.meta, **updates, "calibration": record}
    model_id = save_checkpoint(ckpt.model, out_url or checkpoint_url, meta, storage_options)
    return {**record, "model_id": model_id}


def calibrate(checkpoint_url: str, data_url: str, limit: int | None = 10000, iwae_k: int = 16, seed: int = 0,
              storage_options: StorageOptions = None, rule: str = DEFAULT_RULE,
              uses: tuple[str, ...] | None = None) -> dict:
    """Recalibrate ``checkpoint_url`` on (up to ``limit``) images of ``data_url``; they should be
    normal data the model was not trained on."""
    device = pick_device()
    # Statistics that fail verification are what recalibrating replaces: load without them
    # (once: store_calibration fits and writes this same checkpoint).
    ckpt = load_checkpoint(checkpoint_url, storage_options, map_location=device, verify_calibration=False)
    cfg = ckpt.config
    ds = ShardImageDataset(list_specs(data_url, storage_options), cfg.channels, cfg.image_size, split="all",
                           storage_options=storage_options, resize=trained_resize(ckpt.meta))
    images = load_tensor(ds, limit)
    return store_calibration(checkpoint_url, images, data_url, iwae_k, seed, device, storage_options, ckpt, rule=rule, uses=uses)
