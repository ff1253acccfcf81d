"""Gradient clipping for training: a fixed limit, an adaptive one, and skipped non-finite steps."""
from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from jobs.train import TrainConfig
    from jobs.train_state import TrainState

log = logging.getLogger(__name__)

GRAD_WINDOW = 100  # recent gradient norms the adaptive limit looks at


def grad_limit(cfg: TrainConfig, recent: list[float]) -> float:
    """The gradient-norm limit for the next step: the tighter of the absolute ``grad_clip`` and
    ``grad_clip_factor`` x the median of recent norms; ``inf`` when neither applies.

    The adaptive limit only catches spikes: the norm's scale depends on the likelihood and the
    image size, so a fixed limit that suits one data set binds in most steps of another, while
    the median follows the scale (measured: BENCHMARKS.md, training speed)."""
    limit = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    if cfg.grad_clip_factor > 0 and recent:
        limit = min(limit, cfg.grad_clip_factor * sorted(recent)[len(recent) // 2])
    return limit


def clipped_step(model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig,
                 state: TrainState) -> tuple[float, float]:
    """Clip the gradients (see :func:`grad_limit`) and step the optimiser; a non-finite gradient
    norm (e.g. a bf16 overflow) skips the update instead of poisoning the weights.
    Updates ``state`` (recent norms, clipped and skipped counts); returns (norm, limit)."""
    limit = grad_limit(cfg, state.grad_norms)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), limit).item()
    if math.isfinite(norm):
        opt.step()
        state.grad_norms = (state.grad_norms + [norm])[-GRAD_WINDOW:]
        state.clipped += int(norm > limit)
    else:
        state.skipped += 1
        log.warning("step %d: non-finite gradient norm, update skipped", state.step + 1)
    return norm, limit
