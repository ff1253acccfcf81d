"""Batch scoring: the anomaly scores of a batch of images, shared by the pipeline, ``evaluate``
and calibration (:mod:`vae_model.calibration`, the statistics a checkpoint stores about them).

Scores (higher = more anomalous):
  ``elbo``        -ELBO in nats, one reparameterised sample.
  ``iwae``        -IWAE_k in nats (tighter bound on -log p(x), k decoder passes per image).
  ``complexity``  -ELBO in bits minus the image's length in bits under a lossless coder (WebP
                  lossless): the input-complexity correction of Serra et al. 2020, which removes the
                  bias of likelihoods towards simple images (Nalisnick et al. 2019).
  ``typicality``  -log10 of a calibrated p-value combining (Fisher's method) the tail probabilities
                  of -ELBO, complexity, a KDE density of (-ELBO bits, coder bits) and the posterior
                  mean's nearest-neighbour density under validation images; the reference is
                  stored in the checkpoint (see :mod:`vae_model.typicality`).
The noise for each image is keyed by a 64-bit hash of its pixels, both computed on the batch's
device by integer arithmetic (:mod:`vae_model.noise`), so a score depends on the image alone:
not on batch size, worker, runner, device or where the shard is stored.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .checkpoint_header import calibration_id  # noqa: F401  (the one definition, re-exported for scoring's users)
from .config import EMBED_SCORES, NO_SCORE
from .device import autocast
from .losses import LN2
from .model import VAE
from .noise import hash_noise, key_hashes, pixel_hash, pixel_ids  # noqa: F401  (pixel_ids: re-exported)
from .runtime import tune_allocator
from .typicality import TypicalityReference, required_reference


def compressed_bits(img: np.ndarray, codec: str = "webp", webp_method: int = 4) -> float:
    """Length in bits of one uint8 image (C, H, W) under a lossless coder ("webp" or "png");
    ``webp_method`` 0..6 trades speed for size (the complexity score uses 4)."""
    arr = img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1)
    buf = io.BytesIO()
    if codec == "webp":
        Image.fromarray(arr).save(buf, "WEBP", lossless=True, quality=100, method=webp_method)
    elif codec == "png":
        Image.fromarray(arr).save(buf, "PNG", optimize=True)
    else:
        raise ValueError(f"unknown codec {codec!r}")
    return 8.0 * len(buf.getvalue())


@dataclass
class ScoreOptions:
    """How :func:`score_batch` scores: which score, its parameters, the parsed typicality reference.

    Values are checked where they enter (an embed run's :class:`pipeline.options.EmbedOptions`
    on the driver; the training and calibration commands' options), so only the invariants
    scoring relies on are asserted here; ``iwae_k`` is :meth:`VAE.iwae`'s to check (a
    ValueError), since only the ``iwae`` score uses it. The typicality reference is parsed once,
    here (a ConfigError when the score needs it and it is missing,
    :func:`vae_model.typicality.required_reference`, or malformed), not once per batch.
    """

    score: str = "elbo"  # which score becomes anomaly_score
    iwae_k: int = 64
    seed: int = 0  # base seed of the per-key noise
    precision: str = "fp32"  # "fp32" or "bf16" (autocast): the resolved precision, never "auto"
    codec: str = "webp"  # lossless coder for the complexity score
    reference: dict | None = None  # typicality reference (checkpoint meta "typicality")
    typicality: TypicalityReference | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        assert self.score in EMBED_SCORES and self.precision in ("fp32", "bf16"), self
        reference = required_reference(self.score, self.reference)
        self.typicality = None if reference is None else TypicalityReference.from_dict(reference)


def for_scoring(model: VAE, device: torch.device | str = "cpu", precision: str = "fp32") -> VAE:
    """The model on ``device`` in eval mode with NHWC (channels_last) weights, ready for
    :func:`score_batch` (which feeds it NHWC batches): oneDNN's NHWC convolutions are the faster
    layout for this architecture on the CPU, and scores agree with NCHW to float rounding.

    On CUDA with ``fp32``, cuDNN's TF32 convolutions (PyTorch's default) are switched off: they
    move rows away from CPU rows by more than the 1e-5 reproducibility contract; ``bf16`` is
    the fast opt-in there.

    It also tunes this process's allocator (:func:`vae_model.runtime.tune_allocator`), so that
    each batch's activation memory is reused instead of page-faulted in anew.

    Measured effects of all three: BENCHMARKS.md, "Pipeline throughput" and "GPU".
    """
    tune_allocator()
    device = torch.device(device)
    if device.type == "cuda" and precision == "fp32":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return model.to(device, memory_format=torch.channels_last).eval()


def to_device(images: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 images as a tensor on ``device``: from a pinned host buffer with a non-blocking copy
    when a CPU batch goes to a GPU (torch's caching host allocator reuses the pinned blocks and
    keeps each one until its copy is done), as it is on the CPU (no copy)."""
    x = torch.as_tensor(images)
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


_STATS = ("elbo", "recon_nll", "kl", "bits_per_dim")


@torch.no_grad()
def score_batch(model: VAE, images: np.ndarray | torch.Tensor, keys: list[str] | torch.Tensor | None,
                opts: ScoreOptions, device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
    """Score a batch of uint8 images (B, C, H, W).

    ``keys`` seed each image's noise: strings (hashed by :func:`vae_model.noise.key_hashes`),
    int64 hashes, or ``None`` (the pipeline's choice): the pixels' hashes
    (:func:`vae_model.noise.pixel_hash`), computed on ``device`` like the noise itself. The
    likelihood is summed in float64 on the device, so scores agree to ~1e-6 relative whatever the
    batch; the scores come back to the host in one copy.

    Returns numpy arrays: ``embedding`` (B, D) float32 and (B,) float64 ``elbo`` (the ELBO, nats,
    negative), ``recon_nll``, ``kl``, ``bits_per_dim``, ``anomaly_score`` and, when computed,
    ``iwae_nll`` / ``complexity``.
    With ``score="none"`` only ``embedding`` (the posterior mean: the encoder alone runs).
    """
    device = torch.device(device)
    x = to_device(images, device)
    if opts.score != NO_SCORE:  # before NHWC: the hash reads the (C, H, W) order, no copy
        hashes = (pixel_hash(x) if keys is None else keys.to(device) if isinstance(keys, torch.Tensor)
                  else key_hashes(keys, device))
    if next(model.parameters()).is_contiguous(memory_format=torch.channels_last) and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)  # match a model moved to NHWC
    if opts.score == NO_SCORE:  # the encoder alone: no noise, no decoder, no likelihood
        with autocast(device, opts.precision):
            mean = model.encode(model.prepare(x)[0]).mean
        return {"embedding": mean.float().cpu().numpy()}
    d = model.cfg.latent_dim
    eps = hash_noise(hashes, d, opts.seed)[0]  # (B, D): sample 0 of each image's stream
    with autocast(device, opts.precision):
        terms = model.elbo(x, eps=eps, precise=True)
    stats = torch.stack([-terms.neg_elbo, terms.recon_nll, terms.kl, terms.bits_per_dim]).double().cpu().numpy()
    out = {"embedding": terms.mean.float().cpu().numpy(), **dict(zip(_STATS, stats))}  # (4, B): one copy
    if opts.score == "elbo":
        out["anomaly_score"] = -out["elbo"]
    elif opts.score == "iwae":
        def eps_k(start: int, n: int) -> torch.Tensor:  # one chunk of noise at a time, whatever k is
            return hash_noise(hashes, d, opts.seed + 1, start, n)

        with autocast(device, opts.precision):
            ll = model.iwae(x, opts.iwae_k, eps=eps_k, precise=True)
        out["iwae_nll"] = (-ll).double().cpu().numpy()
        out["anomaly_score"] = out["iwae_nll"]
    else:
        imgs = x.cpu().numpy()
        lengths = np.array([compressed_bits(im, opts.codec) for im in imgs])
        out["code_bits"] = lengths
        out["complexity"] = -out["elbo"] / LN2 - lengths
        if opts.score == "complexity":
            out["anomaly_score"] = out["complexity"]
        else:
            out["typicality"] = opts.typicality.score(np.stack([-out["elbo"] / LN2, lengths], 1), out["embedding"])
            out["anomaly_score"] = out["typicality"]
    return out


def score_all(model: VAE, images: np.ndarray | torch.Tensor, opts: ScoreOptions,
              device: torch.device | str = "cpu", batch_size: int = 256) -> dict[str, np.ndarray]:
    """:func:`score_batch` over any number of images, outputs concatenated."""
    parts = [score_batch(model, images[i:i + batch_size], None, opts, device)
             for i in range(0, len(images), batch_size)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}



_MOVED = {name: "calibration" for name in ("QUANTILES", "fit_reference", "quantile_table", "percentile_of",
                                           "threshold_for")}


def __getattr__(name: str):
    """Names that moved out of this module (calibration statistics to :mod:`vae_model.calibration`,
    which imports this one, hence lazily), still importable from here."""
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(f".{_MOVED[name]}", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
