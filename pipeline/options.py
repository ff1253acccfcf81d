"""What an embed run is asked to do and where it writes: options, output names, checks.

Torch-free on purpose: the Beam driver (and any launcher) imports this, validates a run and
pickles the options for the workers, which import torch only when they load the model.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import re
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.shards import ShardSpec
from vae_model.checkpoint_header import CheckpointInfo
from vae_model.config import SCORES
from vae_model.errors import ConfigError
from vae_model.storage import join

# Read limits (documented in README, "Nothing lost, safe reruns"). 40 Mpx is a 7,700 x 5,200 photo,
# well below Pillow's bomb limit (89 Mpx warn, 179 Mpx error); decoded RGBA that is 160 MB.
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_MEMBER_BYTES = 64 << 20
DEFAULT_MAX_SIDECAR_BYTES = 1 << 20


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass
class EmbedOptions:
    """Everything a worker needs to embed shards (picklable: shipped to Beam workers)."""

    checkpoint: str
    out_url: str
    batch_size: int = 256
    device: str = "auto"  # auto | cpu | cuda
    score: str = "elbo"  # elbo | iwae | complexity | typicality
    iwae_k: int = 64
    threshold_quantile: float = 0.99
    run_date: str | None = None  # YYYY-MM-DD: output goes under dt=YYYY-MM-DD/
    skip_existing: bool = True
    precision: str = "auto"  # auto | fp32 | bf16
    torch_threads: int = 0  # 0: torch's default
    seed: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images (width x height) become dead letters
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES  # larger encoded images become dead letters
    max_sidecar_bytes: int = DEFAULT_MAX_SIDECAR_BYTES  # larger .json/.cls sidecars become dead letters
    storage_options: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be >= 1")
        if self.score not in SCORES:
            raise ConfigError(f"--score {self.score}: choose one of {', '.join(SCORES)}")
        if self.iwae_k < 1:
            raise ConfigError("--iwae-k must be >= 1")
        if not 0 < self.threshold_quantile < 1:
            raise ConfigError("--threshold-quantile must be between 0 and 1, e.g. 0.99")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError("--device must be auto, cpu or cuda")
        if self.device == "cuda" and not _cuda_available():
            raise ConfigError("--device cuda: no CUDA device is available here; use --device auto or cpu")
        if self.run_date is not None:
            try:
                dt.date.fromisoformat(self.run_date)
            except ValueError:
                raise ConfigError(f"--run-date {self.run_date!r}: use YYYY-MM-DD") from None

    @property
    def partition_url(self) -> str:
        return join(self.out_url, f"dt={self.run_date}") if self.run_date else self.out_url

    @property
    def errors_url(self) -> str:
        base = join(self.out_url, "errors")
        return join(base, f"dt={self.run_date}") if self.run_date else base


def output_name(spec: ShardSpec) -> str:
    """Deterministic, unique file name for a shard's output: readable stem + hash of its URL."""
    stem = spec.name.rstrip("/").rsplit("/", 1)[-1]
    stem = re.sub(r"\.(tar|parquet|tgz|tar\.gz)$", "", stem)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)[:80] or "shard"
    digest = hashlib.sha256(spec.name.encode()).hexdigest()[:10]
    return f"{stem}-{digest}.parquet"


def check_score_supported(opts: EmbedOptions, ckpt: CheckpointInfo) -> dict | None:
    """The typicality reference the score needs, or a ConfigError if the checkpoint lacks it."""
    reference = ckpt.meta.get("typicality")
    if opts.score == "typicality" and not reference:
        raise ConfigError(f"{opts.checkpoint} has no typicality reference (trained by an older vaepipe?); "
                          "retrain it or use --score complexity")
    return reference


def options_dict(opts: EmbedOptions) -> dict:
    d = asdict(opts)
    d.pop("storage_options", None)  # may hold credentials
    return d
