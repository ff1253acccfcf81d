"""What an embed run is asked to do and where it writes: options, output names, checks.

Torch-free on purpose: the Beam driver (and any launcher) imports this, validates a run and
pickles the options for the workers, which import torch only when they load the model.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from vae_model.config import EMBED_SCORES
from vae_model.device import DEVICES, PRECISIONS, scoring_precision_for
from vae_model.errors import ConfigError

if TYPE_CHECKING:  # kept out of the import: the CLI builds its flags from this module
    from pipeline.shards import ShardSpec
    from vae_model.checkpoint_header import CheckpointInfo

# Read limits (documented in README, "Nothing lost, safe reruns"). 40 Mpx is a 7,700 x 5,200 photo,
# well below Pillow's bomb limit (89 Mpx warn, 179 Mpx error); decoded RGBA that is 160 MB.
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_MEMBER_BYTES = 64 << 20
DEFAULT_MAX_SIDECAR_BYTES = 1 << 20
MODES = ("refuse", "append", "overwrite")
# How a non-square image becomes the model's square (pipeline.decode, step 5; --resize). Stored in
# a checkpoint's metadata by training; a checkpoint without it was trained with center-crop.
RESIZE_POLICIES = ("center-crop", "pad", "squash")
DEFAULT_RESIZE = "center-crop"
# (option, smallest, largest): checked on the driver, so a bad value fails before anything is written.
# IWAE memory is bounded by chunking whatever k is; the bound on k bounds the time (k decoder passes an image).
_INT_RANGES = (("batch_size", 1, 65536), ("iwae_k", 1, 10000), ("torch_threads", 0, 1024), ("seed", 0, 2 ** 63 - 1),
               ("max_pixels", 1, 2 ** 40), ("max_member_bytes", 1, 2 ** 40), ("max_sidecar_bytes", 0, 2 ** 40))


@dataclass
class EmbedOptions:
    """Everything a worker needs to embed shards (picklable: shipped to Beam workers)."""

    checkpoint: str
    out_url: str
    batch_size: int = 256
    device: str = "auto"  # auto | cpu | cuda
    score: str = "elbo"  # elbo | iwae | complexity | typicality | none (embedding only)
    iwae_k: int = 64
    threshold_quantile: float = 0.99
    run_date: str | None = None  # YYYY-MM-DD: output goes under dt=YYYY-MM-DD/
    skip_existing: bool = True
    precision: str = "auto"  # auto | fp32 | bf16
    torch_threads: int = 0  # 0: torch's default
    seed: int = 0
    storage_options: dict[str, Any] | None = None
    # Added since: keyword use only (the fields above keep their positions).
    mode: str = "refuse"  # refuse | append | overwrite: what to do with a partition that holds other shards' rows
    max_pixels: int = DEFAULT_MAX_PIXELS  # images decoding to more pixels (width x height) become dead letters
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES  # larger encoded images become dead letters
    max_sidecar_bytes: int = DEFAULT_MAX_SIDECAR_BYTES  # larger .json/.cls sidecars become dead letters
    fail_on_drift: bool = False  # exit status 3 (pipeline.drift.DRIFT_EXIT_CODE) when a drift verdict fails
    report: bool = True  # write PARTITION/_report.html (pipeline.report) after the manifest
    # Set by the driver for its workers (not user options): the output lease this run holds and
    # the driver process, so that workers stop when their driver is gone (pipeline.lease).
    lease_owner: str | None = None
    driver: dict[str, Any] | None = None
    # Added since (keyword use only): None = the policy the checkpoint was trained with (resolve_resize).
    resize: str | None = None  # center-crop | pad | squash

    def __post_init__(self) -> None:
        for name, lo, hi in _INT_RANGES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ConfigError(f"--{name.replace('_', '-')} {value!r}: must be an integer from {lo:,} to {hi:,}")
        if self.score not in EMBED_SCORES:
            raise ConfigError(f"--score {self.score}: choose one of {', '.join(EMBED_SCORES)}")
        if not isinstance(self.threshold_quantile, (int, float)) or not 0 < self.threshold_quantile < 1:
            raise ConfigError("--threshold-quantile must be between 0 and 1, e.g. 0.99")
        if self.device not in DEVICES:
            raise ConfigError("--device must be auto, cpu or cuda")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision}: choose one of {', '.join(PRECISIONS)}")
        if self.mode not in MODES:
            raise ConfigError(f"--mode {self.mode}: choose one of {', '.join(MODES)}")
        if self.resize is not None and self.resize not in RESIZE_POLICIES:
            raise ConfigError(f"--resize {self.resize}: choose one of {', '.join(RESIZE_POLICIES)}")
        if self.device == "cuda":
            from vae_model.device import pick_device  # imports torch: only when a GPU is asked for

            pick_device("cuda")  # ConfigError when no CUDA device is available here
        if self.run_date is not None:
            try:
                dt.date.fromisoformat(self.run_date)
            except ValueError:
                raise ConfigError(f"--run-date {self.run_date!r}: use YYYY-MM-DD") from None

    @property
    def partition_url(self) -> str:
        return _join(self.out_url, f"dt={self.run_date}") if self.run_date else self.out_url

    @property
    def errors_url(self) -> str:
        base = _join(self.out_url, "errors")
        return _join(base, f"dt={self.run_date}") if self.run_date else base


@dataclass(frozen=True)
class Flag:
    """One command-line flag of an embed run; type and default come from the EmbedOptions field."""

    field: str
    help: str
    name: str = ""  # default: --field-name
    choices: tuple[str, ...] | None = None
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return self.name or "--" + self.field.replace("_", "-")


# The one list of an embed run's flags: ``vaepipe embed`` (click) and ``python -m pipeline.run``
# (argparse) are both built from it, with EmbedOptions' defaults.
EMBED_FLAGS: tuple[Flag, ...] = (
    Flag("checkpoint", "Checkpoint URL."),
    Flag("out_url", "Output folder/prefix URL for Parquet files.", name="--out"),
    Flag("batch_size", "Images scored per forward pass."),
    Flag("device", "Where to score.", choices=DEVICES),
    Flag("score", "anomaly_score: -ELBO (nats); -IWAE_k (nats); complexity = -ELBO bits minus lossless-coder bits "
                  "(Serra et al. 2020); typicality = -log density of (-ELBO bits, coder bits) among validation "
                  "images plus a latent nearest-neighbour density (best for out-of-distribution inputs); "
                  "none = the embedding only (encoder alone, score columns null; fastest).",
         choices=EMBED_SCORES),
    Flag("iwae_k", "Importance samples for --score iwae."),
    Flag("threshold_quantile", "is_anomaly = score above this quantile of the checkpoint's validation scores."),
    Flag("run_date", "Write under OUT/dt=YYYY-MM-DD/.", metavar="YYYY-MM-DD"),
    Flag("skip_existing", "Skip shards whose output exists with the same model, calibration and settings."),
    Flag("mode", "A partition that already holds rows of shards this run does not read: refuse, append "
                 "(same model, calibration and settings only) or overwrite (those rows are deleted once "
                 "this run has committed every shard).", choices=MODES),
    Flag("precision", "auto: bf16 on CUDA, fp32 on CPU (rows reproducible to 1e-5).", choices=PRECISIONS),
    Flag("torch_threads", "Threads per worker (0: automatic)."),
    Flag("seed", "Base seed of the per-image noise of stochastic scores."),
    Flag("max_pixels", "Images that would decode to more pixels (width x height; a large baseline JPEG's at its reduced "
                       "DCT scale) become dead letters (ImageTooLarge)."),
    Flag("max_member_bytes", "Encoded images larger than this become dead letters (MemberTooLarge)."),
    Flag("max_sidecar_bytes", "Sidecars (.json, .cls, metadata cells) larger than this become dead letters."),
    Flag("fail_on_drift", "Exit with status 3 when a drift verdict of the manifest fails, once every output "
                          "(rows, manifest, _SUCCESS, report) is written."),
    Flag("report", "Write PARTITION/_report.html (as `vaepipe report` does) after the manifest; a report that "
                   "cannot be written only logs a warning."),
    Flag("resize", "How a non-square image becomes square: center-crop (shorter side to the model's size, centre "
                   "kept), pad (longer side to size, white margins) or squash (aspect ignored). Default: the "
                   "policy the checkpoint was trained with (center-crop for checkpoints that do not record one).",
         choices=RESIZE_POLICIES),
)
REQUIRED_FLAGS = ("checkpoint", "out_url")


def flag_default(field_name: str) -> Any:
    return EmbedOptions.__dataclass_fields__[field_name].default


def _join(url: str, part: str) -> str:
    from vae_model.storage import join  # fsspec: not needed to build the CLI

    return join(url, part)


def output_name(spec: ShardSpec) -> str:
    """Deterministic, unique file name for a shard's output: readable stem + hash of its URL."""
    stem = spec.name.rstrip("/").rsplit("/", 1)[-1]
    stem = re.sub(r"\.(tar|parquet|tgz|tar\.gz)$", "", stem)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)[:80] or "shard"
    digest = hashlib.sha256(spec.name.encode("utf-8", "surrogateescape")).hexdigest()[:10]  # names may carry raw bytes
    return f"{stem}-{digest}.parquet"


def trained_resize(meta: dict) -> str:
    """The resize policy a checkpoint's model was trained with (its metadata's ``resize``;
    center-crop when absent: checkpoints written before the policy was recorded)."""
    policy = meta.get("resize") or DEFAULT_RESIZE
    if policy not in RESIZE_POLICIES:
        raise ConfigError(f"checkpoint metadata resize={str(policy)[:40]!r} is not one of {', '.join(RESIZE_POLICIES)}; "
                          "pass --resize")
    return policy


def resolve_resize(opts: EmbedOptions, meta: dict) -> EmbedOptions:
    """``opts`` with ``resize`` set: as given, else the checkpoint's (:func:`trained_resize`).
    The driver resolves it before :func:`output_key`, so the key names the policy used."""
    return opts if opts.resize is not None else replace(opts, resize=trained_resize(meta))


# EmbedOptions fields that never change what a row holds (rows do not depend on batch size,
# worker count, threads or device: README, "Anomaly scores"). Every other field, present or
# future, is part of :func:`output_key`, so a new option cannot be forgotten by skip-existing.
ROW_NEUTRAL_OPTIONS = frozenset({"checkpoint", "out_url", "batch_size", "device", "skip_existing", "torch_threads",
                                 "storage_options", "mode", "lease_owner", "driver", "fail_on_drift",
                                 "report"})
SCORE_VERSION = "2"  # bump when a score's computation changes: outputs written before are then redone
# 2: on-device pixel hash and counter-based noise (vae_model.noise), replacing blake2b + numpy generators


def output_key(opts: EmbedOptions, model_id: str, calibration: str, precision: str) -> tuple[str, dict]:
    """What a shard's output depends on besides its input: ``(hash, settings)``.

    ``precision`` is the resolved one (``auto`` means fp32 on CPU, bf16 on CUDA). Skip-existing
    reuses an output only when its stored hash equals this one; ``--mode append`` adds to a
    partition only when every file there has it.
    """
    settings = {f.name: getattr(opts, f.name) for f in fields(opts) if f.name not in ROW_NEUTRAL_OPTIONS}
    settings.update(precision=precision, model_id=model_id, calibration=calibration, score_version=SCORE_VERSION)
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20], settings


# The scoring precision for a device type (the policy is vae_model.device's; torch-free).
resolved_precision = scoring_precision_for


def check_score_supported(opts: EmbedOptions, ckpt: CheckpointInfo) -> dict | None:
    """The typicality reference the score needs (None for other scores), or a ConfigError if the
    checkpoint lacks it: :func:`vae_model.typicality.required_reference` states the rule."""
    from vae_model.typicality import required_reference  # numpy only: fine on the driver

    return required_reference(opts.score, ckpt.meta.get("typicality"), opts.checkpoint)


def options_dict(opts: EmbedOptions) -> dict:
    d = asdict(opts)
    for name in ("storage_options", "lease_owner", "driver"):  # credentials; run bookkeeping
        d.pop(name, None)
    return d
