"""Per-sample objectives shared by training, evaluation and pipeline scoring.

Every function takes and returns per-sample tensors (shape (B,) or (K, B)); reductions over
the batch are the caller's business, so training and scoring cannot drift apart.

ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z))  <=  log p(x)          (Kingma & Welling 2014)
IWAE_K(x) = E[log (1/K) sum_k p(x, z_k) / q(z_k|x)],  z_k ~ q(z|x)     (Burda et al. 2015)
ELBO = IWAE_1 <= IWAE_K <= IWAE_{K+1} <= log p(x) in expectation.
"""
from __future__ import annotations

import math

import torch

LN2 = math.log(2.0)


def negative_elbo(recon_nll: torch.Tensor, kl: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """-ELBO per sample (nats); with beta != 1 this is the beta-VAE training loss, not a bound."""
    return recon_nll + beta * kl


def free_bits_kl(kl_dims: torch.Tensor, free_bits: float) -> torch.Tensor:
    """The KL term of the free-bits objective (Kingma et al. 2016, IAF, eq. 15), per sample (B,).

    ``kl_dims`` is (B, D). A latent dimension whose batch-mean KL is below ``free_bits`` nats
    contributes the constant ``free_bits`` (no gradient pushing its KL down); the others their
    KL. The batch mean is sum_d max(free_bits, mean_b KL_bd). Training only: this is not a
    bound, and what is reported stays the true ELBO. It keeps a decoder that could model the
    pixels alone (a pixel context) from collapsing the posterior onto the prior."""
    if free_bits <= 0:
        return kl_dims.sum(-1)
    used = kl_dims.detach().mean(0, keepdim=True) >= free_bits  # (1, D)
    return torch.where(used, kl_dims, torch.full_like(kl_dims, free_bits)).sum(-1)


def bits_per_dim(nats: torch.Tensor, num_dims: int) -> torch.Tensor:
    """Convert a per-image negative log-likelihood in nats to bits per pixel value."""
    return nats / (num_dims * LN2)


def importance_log_weights(log_px_given_z: torch.Tensor, log_pz: torch.Tensor,
                           log_qz: torch.Tensor) -> torch.Tensor:
    """log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x), per sample: (K, B)."""
    return log_px_given_z + log_pz - log_qz


def kl_warmup_weight(step: int, warmup_steps: int, beta: float = 1.0) -> float:
    """Linear KL annealing from 0 to ``beta`` over ``warmup_steps`` optimiser steps."""
    if warmup_steps <= 0:
        return beta
    return beta * min(1.0, step / warmup_steps)
