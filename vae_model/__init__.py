"""vae_model: a convolutional VAE with per-sample ELBO/IWAE, safe checkpoints and batch scoring."""
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .config import VAEConfig
from .distributions import BernoulliPixels, DiagonalGaussian, DiscretizedLogisticPixels
from .errors import CheckpointError, ConfigError, VaePipeError
from .model import VAE, ElboTerms

__all__ = ["VAE", "VAEConfig", "ElboTerms", "DiagonalGaussian", "BernoulliPixels", "DiscretizedLogisticPixels",
           "Checkpoint", "load_checkpoint", "save_checkpoint", "CheckpointError", "ConfigError", "VaePipeError"]
