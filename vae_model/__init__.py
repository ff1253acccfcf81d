"""vaepipe's model package: a convolutional VAE with per-sample ELBO/IWAE, safe checkpoints and batch scoring.

Names are imported on first use, so that ``import vae_model.errors`` (the CLI) or
:mod:`vae_model.checkpoint_header` (the Beam driver) does not import torch.
"""
from __future__ import annotations

from .exports import lazy_exports

_EXPORTS = {
    "Checkpoint": "checkpoint", "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
    "CheckpointInfo": "checkpoint_header", "inspect_checkpoint": "checkpoint_header",
    "VAEConfig": "config",
    "BernoulliPixels": "distributions", "DiagonalGaussian": "distributions", "DiscretizedLogisticPixels": "distributions",
    "CheckpointError": "errors", "ConfigError": "errors", "VaePipeError": "errors",
    "VAE": "model", "ElboTerms": "model",
}
__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
