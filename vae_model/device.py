"""The one device and precision policy: where tensors run and in which float format.

Every job (train, calibrate, evaluate, generate) and the embed pipeline pick their device and
precision here, so that the rules below are written once:

* device ``auto`` is the CUDA GPU when torch sees one, else the CPU;
* **training** precision ``auto`` is bf16 autocast where the hardware has fast bf16 (a CUDA GPU
  that supports it, or a CPU with AMX or AVX512-BF16), else fp32;
* **scoring** precision ``auto`` is fp32 on the CPU (rows must agree to 1e-5 whatever the batch
  size or runner, and bf16 rounding does not) and bf16 on a CUDA GPU that supports it (the
  throughput default there).

Torch is imported inside the functions that need it: the Beam driver guesses the workers'
scoring precision with :func:`expected_precision` without importing torch (its start-up cost and
memory stay off the driver; ``tests/test_options.py`` checks it).
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

from vae_model.errors import ConfigError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")


def pick_device(requested: str = "auto") -> torch.device:
    """The device for ``requested`` (auto | cpu | cuda); ``cuda`` without a GPU is a ConfigError."""
    import torch

    if requested not in DEVICES:
        raise ConfigError(f"--device {requested}: choose one of {', '.join(DEVICES)}")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here; use --device auto or cpu")
    return torch.device(requested)


def expected_device_type(requested: str, gpu_present: bool) -> str:
    """The device type :func:`pick_device` will choose on a machine with (or without) a GPU,
    known without torch (the driver's guess for its workers)."""
    return "cuda" if requested == "cuda" or (requested == "auto" and gpu_present) else "cpu"


def scoring_precision_for(requested: str, device_type: str, bf16_supported: bool = True) -> str:
    """The scoring rule of the module docstring, torch-free: ``auto`` is bf16 only on a CUDA
    device with bf16 support, fp32 everywhere else."""
    if requested != "auto":
        return requested
    return "bf16" if device_type == "cuda" and bf16_supported else "fp32"


def expected_precision(requested_precision: str, requested_device: str, gpu_present: bool) -> str:
    """The scoring precision workers on this machine will resolve to (the Beam driver's guess,
    which goes into the output key); torch-free. Assumes a present GPU supports bf16."""
    return scoring_precision_for(requested_precision, expected_device_type(requested_device, gpu_present))


def scoring_precision(requested: str, device: torch.device) -> str:
    """The precision for scoring on ``device``: see the module docstring."""
    return scoring_precision_for(requested, device.type, bf16_supported=_cuda_bf16(device))


def training_precision(requested: str, device: torch.device) -> str:
    """The precision for training on ``device``: bf16 autocast where bf16 is fast, else fp32."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if _cuda_bf16(device) else "fp32"
    import torch

    cpu = torch.cpu
    fast_bf16 = any(getattr(cpu, name, lambda: False)() for name in
                    ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return "bf16" if fast_bf16 else "fp32"


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """bf16 autocast on ``device`` when ``precision`` is bf16, else a no-op context."""
    if precision != "bf16":
        return nullcontext()
    import torch

    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _cuda_bf16(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    import torch

    return torch.cuda.is_bf16_supported()
