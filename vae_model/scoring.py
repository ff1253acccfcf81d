"""Batch scoring shared by the pipeline, ``evaluate`` and the training job's score quantiles.

Scores (higher = more anomalous):
  ``elbo``        -ELBO in nats, one reparameterised sample.
  ``iwae``        -IWAE_k in nats (tighter bound on -log p(x), k decoder passes per image).
  ``complexity``  -ELBO in bits minus the image's length in bits under a lossless coder (WebP
                  lossless): the input-complexity correction of Serra et al. 2020, which removes the
                  bias of likelihoods towards simple images (Nalisnick et al. 2019).
  ``typicality``  -log density of (-ELBO bits, coder bits) under a KDE fitted on validation images,
                  plus the -log nearest-neighbour density of the posterior mean among the validation
                  images' posterior means; the reference is stored in the checkpoint (see
                  :mod:`vae_model.typicality`).
The noise for each image is seeded by a hash of its pixels, so a score depends on the image
alone: not on batch size, worker, runner or where the shard is stored.
"""
from __future__ import annotations

import hashlib
import io
import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .checkpoint_header import calibration_id  # noqa: F401  (the one definition, re-exported for scoring's users)
from .config import SCORES
from .model import VAE, iwae_noise_for_keys, noise_for_keys
from .runtime import tune_allocator
from .typicality import TypicalityReference

QUANTILES = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)
LN2 = math.log(2.0)


def compressed_bits(img: np.ndarray, codec: str = "webp") -> float:
    """Length in bits of one uint8 image (C, H, W) under a lossless coder ("webp" or "png")."""
    arr = img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1)
    buf = io.BytesIO()
    if codec == "webp":
        Image.fromarray(arr).save(buf, "WEBP", lossless=True, quality=100, method=4)
    elif codec == "png":
        Image.fromarray(arr).save(buf, "PNG", optimize=True)
    else:
        raise ValueError(f"unknown codec {codec!r}")
    return 8.0 * len(buf.getvalue())


@dataclass
class ScoreOptions:
    score: str = "elbo"  # which score becomes anomaly_score
    iwae_k: int = 64
    seed: int = 0  # base seed of the per-key noise
    precision: str = "fp32"  # "fp32" or "bf16" (autocast)
    codec: str = "webp"  # lossless coder for the complexity score
    reference: dict | None = None  # typicality reference (checkpoint meta "typicality")
    typicality: TypicalityReference | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ValueError(f"score={self.score!r}: choose one of {', '.join(SCORES)}")
        if self.iwae_k < 1:
            raise ValueError("iwae_k must be >= 1")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError("precision must be fp32 or bf16")
        if self.score == "typicality" and not self.reference:
            raise ValueError("score 'typicality' needs the checkpoint's typicality reference (retrain with this "
                             "vaepipe version, or choose --score complexity)")
        # parsed once: rebuilding thousands of reference points from JSON per batch cost ~0.2 ms/image
        self.typicality = TypicalityReference.from_dict(self.reference) if self.score == "typicality" else None


def for_scoring(model: VAE, device: torch.device | str = "cpu", precision: str = "fp32") -> VAE:
    """The model on ``device`` in eval mode with NHWC (channels_last) weights: ~1.4x the
    throughput of NCHW with oneDNN on this architecture, scores within ~1e-6 relative
    (benchmarks/fix_probe.py). :func:`score_batch` feeds such a model NHWC batches.

    On CUDA with ``fp32``, cuDNN's TF32 convolutions (PyTorch's default) are switched off: with
    them rows differed from CPU rows by ~1e-3 in the embedding (measured on an H200), outside
    the 1e-5 contract; ``bf16`` is the fast opt-in there.

    It also tunes this process's allocator (:func:`vae_model.runtime.tune_allocator`): scoring
    batches of 256 ran 1.2-1.3x faster on the CPU with activation memory reused instead of
    page-faulted in anew every batch."""
    tune_allocator()
    device = torch.device(device)
    if device.type == "cuda" and precision == "fp32":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return model.to(device, memory_format=torch.channels_last).eval()


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def pixel_ids(images: np.ndarray) -> list[str]:
    """Content ids of uint8 images (B, C, H, W): the seeds of their per-image noise."""
    return [hashlib.blake2b(np.ascontiguousarray(im).tobytes(), digest_size=16).hexdigest() for im in images]


@torch.no_grad()
def score_batch(model: VAE, images: np.ndarray | torch.Tensor, keys: list[str] | None,
                opts: ScoreOptions, device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
    """Score a batch of uint8 images (B, C, H, W).

    ``keys`` seed each image's noise; ``None`` (the pipeline's choice) derives them from the pixels.
    The likelihood is summed in float64, so scores agree to ~1e-6 relative whatever the batch.

    Returns numpy arrays: ``embedding`` (B, D) float32 and (B,) float64 ``elbo`` (the ELBO, nats,
    negative), ``recon_nll``, ``kl``, ``bits_per_dim``, ``anomaly_score`` and, when computed,
    ``iwae_nll`` / ``complexity``.
    """
    device = torch.device(device)
    if keys is None:
        keys = pixel_ids(images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images))
    x = torch.as_tensor(images).to(device, non_blocking=True)
    if next(model.parameters()).is_contiguous(memory_format=torch.channels_last) and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)  # match a model moved to NHWC
    d = model.cfg.latent_dim
    eps = noise_for_keys(keys, (d,), opts.seed).to(device)
    with autocast(device, opts.precision):
        terms = model.elbo(x, eps=eps, precise=True)
    out = {
        "embedding": terms.mean.float().cpu().numpy().astype(np.float32),
        "elbo": (-terms.neg_elbo).double().cpu().numpy(),
        "recon_nll": terms.recon_nll.double().cpu().numpy(),
        "kl": terms.kl.double().cpu().numpy(),
        "bits_per_dim": terms.bits_per_dim.double().cpu().numpy(),
    }
    if opts.score == "elbo":
        out["anomaly_score"] = -out["elbo"]
    elif opts.score == "iwae":
        def eps_k(start: int, n: int) -> torch.Tensor:  # one chunk of noise at a time, whatever k is
            return iwae_noise_for_keys(keys, d, opts.seed + 1, start, n)

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


def fit_reference(model: VAE, images: np.ndarray | torch.Tensor, opts: ScoreOptions,
                  device: torch.device | str = "cpu",
                  fit_fraction: float = 0.75) -> tuple[dict, dict[str, dict[str, float]]]:
    """Validation statistics stored in a checkpoint: the typicality reference (fitted on the first
    ``fit_fraction`` of ``images``: its densities sharpen with more points) and the quantiles of
    every score (typicality's on the rest, so that its percentiles are not flattered by scoring
    the reference's own points)."""
    base = score_all(model, images, ScoreOptions("complexity", opts.iwae_k, opts.seed, codec=opts.codec), device)
    iwae = score_all(model, images, ScoreOptions("iwae", opts.iwae_k, opts.seed), device)
    feats = np.stack([-base["elbo"] / LN2, base["code_bits"]], 1)
    cut = int(len(feats) * fit_fraction)
    if cut < 16 or len(feats) - cut < 8:
        raise ValueError(f"{len(feats)} validation images are too few to fit the typicality reference "
                         "(need at least 32; more gives sharper scores)")
    ref = TypicalityReference.fit(feats[:cut], base["embedding"][:cut])
    held = ref.score(feats[cut:], base["embedding"][cut:])
    tables = {"elbo": quantile_table(-base["elbo"]), "iwae": quantile_table(iwae["anomaly_score"]),
              "complexity": quantile_table(base["complexity"]), "typicality": quantile_table(held)}
    return ref.to_dict(), tables


def quantile_table(scores: np.ndarray, quantiles: tuple[float, ...] = QUANTILES) -> dict[str, float]:
    """{"0.5": v, ...} plus min/max, for percentiles and thresholds later."""
    qs = np.quantile(scores, quantiles)
    table = {f"{q:g}": float(v) for q, v in zip(quantiles, qs)}
    table["min"], table["max"] = float(np.min(scores)), float(np.max(scores))
    table["n"] = int(len(scores))
    return table


def percentile_of(scores: np.ndarray, table: dict[str, float]) -> np.ndarray:
    """Approximate percentile (0..100) of each score within the validation distribution, by
    piecewise-linear interpolation through the stored quantiles (clipped to [0, 100])."""
    qs, vs = _quantile_curve(table)
    return 100.0 * np.interp(scores, vs, qs, left=0.0, right=1.0)


def threshold_for(table: dict[str, float], quantile: float) -> float:
    """Score at a validation quantile (interpolated through the stored table)."""
    qs, vs = _quantile_curve(table)
    return float(np.interp(quantile, qs, vs))


def _quantile_curve(table: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """(quantiles 0..1, non-decreasing score values) from a :func:`quantile_table`."""
    pts = sorted((float(k), v) for k, v in table.items() if k not in ("min", "max", "n"))
    qs = [0.0] + [q for q, _ in pts] + [1.0]
    vs = [table.get("min", pts[0][1])] + [v for _, v in pts] + [table.get("max", pts[-1][1])]
    return np.asarray(qs), np.maximum.accumulate(np.asarray(vs, dtype=np.float64))
