"""The training loop's state and its resume file ``<out>.resume.pt``.

The resume file is a ``torch.save`` dict (:data:`RESUME_KEYS`): the weights, the optimiser, the
two generator states, the model config, and the loop state as JSON (:class:`TrainState`). It is
read with ``weights_only=True`` (nothing is unpickled) and checked key by key, so that a damaged
or foreign file fails with one line that says what is wrong and how to start afresh.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from vae_model.config import VAEConfig
from vae_model.errors import ConfigError, StorageError, VaePipeError
from vae_model.model import VAE
from vae_model.storage import StorageOptions, atomic_write_bytes, read_bytes

# What a resume file holds: key -> type. ``state`` is JSON holding at least STATE_KEYS.
RESUME_KEYS: dict[str, type] = {"model": dict, "optimizer": dict, "rng": dict, "model_config": dict, "state": str}
STATE_KEYS: dict[str, tuple[type, ...]] = {"epoch": (int,), "step": (int,), "step_in_epoch": (int,),
                                           "best": (int, float), "bad_epochs": (int,), "history": (list,)}


@dataclass
class TrainState:
    """Where a run is: everything besides weights, optimiser and RNGs that ``--resume`` needs."""

    epoch: int = 0  # epochs finished
    step: int = 0  # optimiser steps taken (skipped updates included)
    step_in_epoch: int = 0  # batches of the current epoch already trained on
    best: float = math.inf  # best validation -ELBO so far (nats)
    best_bpd: float = math.inf  # its bits/dim
    bad_epochs: int = 0  # epochs since the last improvement
    grad_norms: list[float] = field(default_factory=list)  # recent gradient norms (jobs.clipping)
    clipped: int = 0  # steps whose gradient was clipped
    skipped: int = 0  # steps skipped for a non-finite gradient norm
    steps_per_epoch: int | None = None  # known once the first epoch is done
    cached: bool = False  # the first epoch's images fitted in memory (later epochs draw from there)
    history: list[dict[str, Any]] = field(default_factory=list)  # the metrics lines so far

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json_dict(cls, state: dict[str, Any]) -> TrainState:
        """The state saved as ``state`` (a JSON object holding at least STATE_KEYS, as checked by
        :func:`load_resume`); keys a file lacks (older vaepipe) take their defaults, and ``None``
        values of the optional keys too."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in state.items() if k in known and v is not None}
        values["best"] = float(values["best"])
        return cls(**values)


def bad_resume(url: str, why: str) -> VaePipeError:
    return VaePipeError(f"{url}: not a usable resume state ({why}); delete it to start afresh")


def save_resume(url: str, model: VAE, opt: torch.optim.Optimizer, gen: torch.Generator, model_cfg: VAEConfig,
                state: TrainState, storage_options: StorageOptions) -> None:
    """Write the resume file in one atomic step (the weights of the uncompiled module)."""
    payload = {"model": model.state_dict(), "optimizer": opt.state_dict(),
               "rng": {"gen": gen.get_state(), "torch": torch.get_rng_state()},
               "model_config": model_cfg.to_dict(), "state": state.to_json()}
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(url, buf.getvalue(), storage_options)


def load_resume(url: str, storage_options: StorageOptions) -> dict:
    """The resume file at ``url``, its structure checked (not its tensors: :func:`apply_resume`);
    ``state`` comes back as a :class:`TrainState`."""
    try:
        # weights_only: tensors, numbers, strings and containers only; nothing is unpickled.
        saved = torch.load(io.BytesIO(read_bytes(url, storage_options)), weights_only=True)
    except StorageError:
        raise
    except Exception as exc:
        raise VaePipeError(f"{url}: unreadable resume state ({type(exc).__name__}); delete it to start afresh") from None
    if not isinstance(saved, dict):
        raise bad_resume(url, f"a {type(saved).__name__}, not a dict")
    missing = [k for k in RESUME_KEYS if k not in saved]
    if missing:
        raise bad_resume(url, f"missing {', '.join(missing)}")
    wrong = next((k for k, t in RESUME_KEYS.items() if not isinstance(saved[k], t)), None)
    if wrong:
        raise bad_resume(url, f"{wrong} must be {RESUME_KEYS[wrong].__name__}, not {type(saved[wrong]).__name__}")
    if not all(isinstance(saved["rng"].get(k), torch.Tensor) for k in ("gen", "torch")):
        raise bad_resume(url, "rng lacks the gen and torch generator states")
    saved["state"] = TrainState.from_json_dict(_state_object(url, saved["state"]))
    return saved


def _state_object(url: str, text: str) -> dict[str, Any]:
    try:
        state = json.loads(text)
    except json.JSONDecodeError:
        raise bad_resume(url, "state is not JSON") from None
    if not isinstance(state, dict):
        raise bad_resume(url, "state is not a JSON object")
    wrong = next((k for k, t in STATE_KEYS.items()
                  if not isinstance(state.get(k), t) or isinstance(state.get(k), bool)), None)
    if wrong:
        raise bad_resume(url, f"state.{wrong} is missing or not {'/'.join(t.__name__ for t in STATE_KEYS[wrong])}")
    return state


def apply_resume(url: str, saved: dict, model: VAE, opt: torch.optim.Optimizer, gen: torch.Generator,
                 model_cfg: VAEConfig) -> TrainState:
    """Restore weights, optimiser and RNGs from a :func:`load_resume` dict; returns its state."""
    if saved["model_config"] != model_cfg.to_dict():
        raise ConfigError(f"{url} was written for a different model config; drop --resume or match flags")
    try:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        gen.set_state(saved["rng"]["gen"])
        torch.set_rng_state(saved["rng"]["torch"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
        first = (str(exc).splitlines() or [""])[0][:200]
        raise bad_resume(url, f"weights, optimiser or RNG do not fit: {type(exc).__name__} {first}") from None
    return saved["state"]
