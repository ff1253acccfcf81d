"""The training job: shards -> VAE checkpoint, as one linear story.

Artifacts beside the checkpoint ``<out>`` (any fsspec URL):
  ``<out>``                the best model by validation ELBO, calibrated (safetensors, self-describing)
  ``<out>.best.safetensors``  the best model so far, uncalibrated: the staging copy that training
                           writes after each improving epoch and ``--resume`` continues from
  ``<out>.resume.pt``      latest weights + optimiser + RNG + data position, for ``--resume``
  ``<out>.metrics.jsonl``  one JSON object per log interval and per epoch
  ``<out>.epochNNN.png``   prior samples (top) and validation reconstructions (bottom)

``<out>`` is written once, at the end, in one atomic step and only after calibration succeeded:
it is either absent or a complete calibrated checkpoint, never one the run declared failed.
Everything that can be checked before the first step is (options, validation set size).

The story, one function each: :func:`start` (device, data, model), :func:`restore` (``--resume``),
then per epoch :func:`train_epoch` (:func:`train_step` per batch) and :func:`end_epoch`
(validate, keep the best, resume state, grid, early stop), and :func:`publish_calibrated`.
The loop's state is a :class:`jobs.train_state.TrainState`.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from jobs.calibrate import MIN_IMAGES, store_calibration
from jobs.clipping import GRAD_WINDOW, clipped_step, grad_limit  # noqa: F401  (importable from here, as before)
from jobs.data import ShardImageDataset, fingerprint, list_specs, load_tensor
from jobs.epoch_data import Collector, epoch_batches, fill_cache
from jobs.evaluate import TermMeans
from jobs.grid import save_grid
from jobs.train_state import TrainState, apply_resume, load_resume, save_resume
from pipeline.options import DEFAULT_RESIZE, RESIZE_POLICIES
from vae_model import losses
from vae_model.checkpoint import save_checkpoint
from vae_model.config import VAEConfig
from vae_model.device import PRECISIONS, autocast, pick_device, training_precision
from vae_model.errors import ConfigError, VaePipeError
from vae_model.model import VAE
from vae_model.runtime import tune_allocator
from vae_model.storage import StorageOptions, atomic_write_bytes, exists, get_fs

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    data_url: str
    out: str  # checkpoint URL
    val_url: str | None = None  # separate validation data; else a hash split of data_url
    val_fraction: float = 0.05
    val_limit: int = 10000  # validation images held in memory
    epochs: int = 10
    time_limit: float | None = None  # seconds; stops cleanly (resumable) when reached
    batch_size: int = 128
    lr: float = 1e-3
    lr_schedule: str = "constant"  # constant | cosine (to lr * lr_min_ratio at the last epoch or the time limit)
    lr_min_ratio: float = 0.02
    weight_decay: float = 1e-4
    kl_warmup_steps: int = 1000
    free_bits: float = 0.0  # nats per latent dimension (losses.free_bits_kl); 0: the plain ELBO
    grad_clip: float = 0.0  # absolute limit on the gradient norm (0: none)
    grad_clip_factor: float = 5.0  # limit = factor x median of the last GRAD_WINDOW norms (0: none)
    patience: int = 5  # epochs without validation improvement before stopping
    seed: int = 0
    num_workers: int = 1  # DataLoader worker processes streaming shards
    shuffle_buffer: int = 4096
    cache_bytes: int = 1 << 30  # keep the decoded training split in memory after epoch 1 when it fits (0: stream)
    precision: str = "auto"  # auto | fp32 | bf16
    resume: bool = False
    quantile_images: int = 10000  # validation images for the score quantiles and typicality reference
    quantile_iwae_k: int = 16
    log_every: int = 50  # steps between metrics lines
    model: dict[str, Any] = field(default_factory=dict)  # VAEConfig fields
    storage_options: dict[str, Any] | None = None
    resize: str = DEFAULT_RESIZE  # center-crop | pad | squash (pipeline.decode); stored in the checkpoint's meta

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.epochs < 1:
            raise ConfigError("--batch-size and --epochs must be >= 1")
        if not self.lr > 0 or not 0 < self.lr_min_ratio <= 1 or self.weight_decay < 0:  # NaN fails too
            raise ConfigError(f"--lr must be > 0 (got {self.lr}), lr_min_ratio in (0, 1] and --weight-decay >= 0")
        if self.time_limit is not None and not self.time_limit >= 0:  # 0: one step, then stop (resumable)
            raise ConfigError(f"--time-limit must be a number of seconds >= 0, got {self.time_limit}")
        if not (self.free_bits >= 0 and self.kl_warmup_steps >= 0):
            raise ConfigError("--free-bits and --kl-warmup-steps must be >= 0")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"--lr-schedule must be constant or cosine, not {self.lr_schedule!r}")
        if self.grad_clip < 0 or not (self.grad_clip_factor == 0 or self.grad_clip_factor >= 1):
            raise ConfigError("--grad-clip must be >= 0 and --grad-clip-factor 0 (off) or >= 1")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError("--val-fraction must be in [0, 1)")
        if self.val_url is None and self.val_fraction == 0:
            raise ConfigError("validation data is needed for best-checkpoint selection: give --val URL or "
                              "--val-fraction > 0")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be {', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}, "
                              f"not {self.precision!r}")
        if self.quantile_iwae_k < 1:
            raise ConfigError(f"quantile_iwae_k={self.quantile_iwae_k}: must be >= 1")
        if min(self.val_limit, self.quantile_images) < MIN_IMAGES:
            raise ConfigError(f"val_limit={self.val_limit} and quantile_images={self.quantile_images} must be "
                              f">= {MIN_IMAGES}: calibration needs that many validation images")
        if self.resize not in RESIZE_POLICIES:
            raise ConfigError(f"--resize {self.resize}: choose one of {', '.join(RESIZE_POLICIES)}")
        if self.patience < 1 or self.log_every < 1 or self.num_workers < 0:
            raise ConfigError("--patience and log_every must be >= 1, --num-workers >= 0")


@dataclass
class TrainResult:
    checkpoint: str
    model_id: str
    epochs: int
    steps: int
    best_val_neg_elbo: float
    best_val_bits_per_dim: float
    stopped: str  # "epochs" | "early_stopping" | "time_limit"
    seconds: float



BEST = ".best.safetensors"  # the staging sidecar (module docstring)
RESUME = ".resume.pt"
METRICS = ".metrics.jsonl"


@dataclass
class Session:
    """What one run trains with, built by :func:`start` before the first step."""

    cfg: TrainConfig
    model_cfg: VAEConfig
    device: torch.device
    precision: str  # resolved: fp32 | bf16
    model: VAE
    opt: torch.optim.Optimizer
    gen: torch.Generator  # the training noise (latent samples, binarisation)
    train_ds: ShardImageDataset
    x_val: torch.Tensor  # uint8 (N, C, H, W): validation, then calibration
    data_fp: str  # fingerprint of the training shards
    t_start: float  # time.monotonic() when the run began
    cache: torch.Tensor | None = None  # the decoded training split, once it is known to fit (jobs.epoch_data)

    def url(self, suffix: str) -> str:
        return self.cfg.out + suffix

    def elapsed(self) -> float:
        return time.monotonic() - self.t_start

    @property
    def loader_kw(self) -> dict[str, Any]:
        return dict(batch_size=self.cfg.batch_size, num_workers=self.cfg.num_workers, drop_last=False,
                    persistent_workers=False, pin_memory=self.device.type == "cuda")


@dataclass
class EpochStats:
    """What :func:`train_epoch` saw: for the epoch's metrics line."""

    train: TermMeans = field(default_factory=lambda: TermMeans("neg_elbo"))  # the batches trained on
    t0: float = field(default_factory=time.monotonic)  # when the epoch began
    kept: torch.Tensor | None = None  # epoch 1's images, when they fitted in cache_bytes
    timed_out: bool = False

    @property
    def img_per_s(self) -> float:
        """Images trained on per second since the epoch began (at the epoch's end: validation included)."""
        return self.train.n / max(time.monotonic() - self.t0, 1e-9)


def train(cfg: TrainConfig, progress: bool = True,
          on_epoch: Callable[[dict], None] | None = None) -> TrainResult:
    """Train a VAE on ``cfg.data_url`` and write the best checkpoint to ``cfg.out``."""
    t_start = time.monotonic()
    tune_allocator()  # reuse activation memory between steps (BENCHMARKS.md, training speed)
    session = start(cfg, t_start)
    state = restore(session)
    stopped = "epochs"
    while state.epoch < cfg.epochs:
        stats = train_epoch(session, state, progress)
        if stats.timed_out:
            stopped = "time_limit"
            save_resume(session.url(RESUME), session.model, session.opt, session.gen, session.model_cfg, state,
                        cfg.storage_options)
            break
        if end_epoch(session, state, stats, progress, on_epoch):
            stopped = "early_stopping"
            break
    _write_jsonl(session.url(METRICS), state.history, cfg.storage_options)
    if not math.isfinite(state.best):
        raise VaePipeError("training stopped before the first epoch finished (time limit?): no checkpoint written; "
                           "rerun with --resume to continue")
    model_id = publish_calibrated(cfg, session.x_val, session.device)
    return TrainResult(cfg.out, model_id, state.epoch, state.step, state.best, state.best_bpd, stopped,
                       time.monotonic() - t_start)


def start(cfg: TrainConfig, t_start: float) -> Session:
    """Device, data, model and optimiser; checks all that can fail before the first step
    (the output URL, the validation set's size)."""
    so = cfg.storage_options
    device = pick_device()
    get_fs(cfg.out, so)  # fail early on an unusable output URL
    model_cfg = VAEConfig.default_for(cfg.model.get("image_size", 28), cfg.model.get("channels", 1),
                                      **{k: v for k, v in cfg.model.items() if k not in ("image_size", "channels")})
    specs = list_specs(cfg.data_url, so)
    data_fp = fingerprint(specs, so)
    common = dict(channels=model_cfg.channels, size=model_cfg.image_size, seed=cfg.seed, storage_options=so,
                  resize=cfg.resize)
    if cfg.val_url:
        train_ds = ShardImageDataset(specs, split="all", shuffle_buffer=cfg.shuffle_buffer, **common)
        val_ds = ShardImageDataset(list_specs(cfg.val_url, so), split="all", **common)
    else:
        train_ds = ShardImageDataset(specs, split="train", val_fraction=cfg.val_fraction,
                                     shuffle_buffer=cfg.shuffle_buffer, **common)
        val_ds = ShardImageDataset(specs, split="val", val_fraction=cfg.val_fraction, **common)
    x_val = load_tensor(val_ds, cfg.val_limit)
    if len(x_val) < MIN_IMAGES:  # calibration at the end would fail: fail before the first step
        raise ConfigError(f"{len(x_val)} validation images from {cfg.val_url or cfg.data_url}: calibration needs at "
                          f"least {MIN_IMAGES}; raise --val-fraction (now {cfg.val_fraction:g}) or pass a larger --val")
    torch.manual_seed(cfg.seed)  # data loading draws no torch random numbers: the same model either way
    model = VAE(model_cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    return Session(cfg, model_cfg, device, training_precision(cfg.precision, device), model, opt, gen, train_ds,
                   x_val, data_fp, t_start)


def restore(session: Session) -> TrainState:
    """With ``--resume`` and a resume file: its weights, optimiser, RNGs and loop state, and the
    in-memory training split when the run had one; else a fresh state."""
    cfg, url = session.cfg, session.url(RESUME)
    if not (cfg.resume and exists(url, cfg.storage_options)):
        return TrainState()
    state = apply_resume(url, load_resume(url, cfg.storage_options), session.model, session.opt, session.gen,
                         session.model_cfg)
    log.info("resumed from %s at epoch %d step %d", url, state.epoch, state.step)
    if state.epoch > 0 and state.cached:
        session.cache = fill_cache(session.train_ds, session.loader_kw, cfg.cache_bytes)
    return state


def train_epoch(session: Session, state: TrainState, progress: bool = False) -> EpochStats:
    """Train on epoch ``state.epoch`` from batch ``state.step_in_epoch`` on (an exact resume
    replays the data order and skips what was trained on); stops early at the time limit."""
    from tqdm.auto import tqdm

    cfg, epoch, skip = session.cfg, state.epoch, state.step_in_epoch
    session.model.train()
    keep = Collector(cfg.cache_bytes) if session.cache is None and epoch == 0 and cfg.cache_bytes > 0 else None
    stats = EpochStats()
    bar = tqdm(desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="img", disable=not progress, leave=False)
    for i, x in enumerate(epoch_batches(session.train_ds, session.cache, session.loader_kw, cfg.seed, epoch)):
        if keep is not None:
            keep.add(x)
        if i < skip:
            continue
        x = x.to(session.device, non_blocking=True)
        record = train_step(session, state, x)
        state.step_in_epoch = i + 1
        stats.train.add(neg_elbo=record.pop("terms").neg_elbo)
        bar.update(len(x))
        bar.set_postfix(loss=f"{record['loss']:.1f}", elbo=f"{-record['neg_elbo']:.1f}",
                        img_s=f"{stats.img_per_s:.0f}")
        if state.step % cfg.log_every == 0:
            state.history.append({"event": "step", "epoch": epoch, **record, "img_per_s": stats.img_per_s})
        if cfg.time_limit is not None and session.elapsed() > cfg.time_limit:
            stats.timed_out = True
            break
    bar.close()
    stats.kept = keep.images() if keep is not None else None
    return stats


def train_step(session: Session, state: TrainState, x: torch.Tensor) -> dict[str, Any]:
    """One optimiser step on batch ``x``; returns its metrics (and the ELBO terms under ``terms``)."""
    cfg, model = session.cfg, session.model
    for group in session.opt.param_groups:
        group["lr"] = cfg.lr * lr_factor(cfg, state, session.elapsed())
    beta = losses.kl_warmup_weight(state.step, cfg.kl_warmup_steps, session.model_cfg.beta)
    with autocast(session.device, session.precision):
        terms = model(x, generator=session.gen)
    loss = losses.negative_elbo(terms.recon_nll, losses.free_bits_kl(terms.kl_dims, cfg.free_bits), beta).mean()
    session.opt.zero_grad(set_to_none=True)
    loss.backward()
    norm, limit = clipped_step(model, session.opt, cfg, state)
    state.step += 1
    return {"step": state.step, "loss": loss.item(), "neg_elbo": terms.neg_elbo.mean().item(),
            "kl": terms.kl.mean().item(), "beta": beta, "grad_norm": norm,
            "grad_limit": limit if math.isfinite(limit) else None, "clipped_steps": state.clipped,
            "skipped_steps": state.skipped, "terms": terms}


def end_epoch(session: Session, state: TrainState, stats: EpochStats, progress: bool = False,
              on_epoch: Callable[[dict], None] | None = None) -> bool:
    """After a full epoch: validate, keep the best model, write the resume state, metrics and
    grid. Returns whether to stop early (``patience`` epochs without improvement)."""
    cfg, so, epoch = session.cfg, session.cfg.storage_options, state.epoch
    if epoch == 0:
        state.steps_per_epoch = state.step_in_epoch
        session.cache = stats.kept
        state.cached = session.cache is not None
    val = evaluate_tensor(session.model, session.x_val, 512, cfg.seed, precision="fp32", device=session.device)
    state.epoch += 1
    state.step_in_epoch = 0
    rec = {"event": "epoch", "epoch": state.epoch, "step": state.step, "train_neg_elbo": stats.train.mean("neg_elbo"),
           "val_neg_elbo": val["neg_elbo"], "val_bits_per_dim": val["bits_per_dim"], "val_recon_nll": val["recon_nll"],
           "val_kl": val["kl"], "img_per_s": stats.img_per_s, "precision": session.precision,
           "lr": session.opt.param_groups[0]["lr"], "clipped_steps": state.clipped, "skipped_steps": state.skipped,
           "data": "memory" if epoch > 0 and session.cache is not None else "stream", "elapsed_s": session.elapsed()}
    state.history.append(rec)
    improved = val["neg_elbo"] < state.best
    if improved:
        state.best, state.best_bpd, state.bad_epochs = val["neg_elbo"], val["bits_per_dim"], 0
        save_checkpoint(session.model, session.url(BEST), _meta(session, state, val), so)
    else:
        state.bad_epochs += 1
    save_resume(session.url(RESUME), session.model, session.opt, session.gen, session.model_cfg, state, so)
    _write_jsonl(session.url(METRICS), state.history, so)
    _epoch_grid(session, state.epoch)
    if progress:
        from tqdm.auto import tqdm

        tqdm.write(f"epoch {state.epoch}: val -ELBO {val['neg_elbo']:.2f} nats "
                   f"({val['bits_per_dim']:.4f} bits/dim){' *' if improved else ''}")
    if on_epoch:
        on_epoch(rec)
    return state.bad_epochs >= cfg.patience


@torch.no_grad()
def evaluate_tensor(model: VAE, x: torch.Tensor, batch_size: int, seed: int, precision: str = "fp32",
                    device: torch.device | None = None) -> dict[str, float]:
    """Mean -ELBO (nats), bits/dim, recon and KL over a uint8 tensor; deterministic given seed.

    Bernoulli models are scored on a seeded stochastic binarisation, the protocol ``vaepipe
    evaluate`` uses for dynamically binarised data (a 0.5 threshold gives much easier images)."""
    device = device or torch.device("cpu")
    model.eval()
    g = torch.Generator(device=device).manual_seed(seed)
    binarize = g if model.cfg.likelihood == "bernoulli" else None
    means = TermMeans("neg_elbo", "recon_nll", "kl")
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device)
        eps = torch.randn((len(xb), model.cfg.latent_dim), generator=g, device=device)
        with autocast(device, precision):
            t = model.elbo(xb, generator=binarize, eps=eps)
        means.add(neg_elbo=t.neg_elbo, recon_nll=t.recon_nll, kl=t.kl)
    out = {name: means.mean(name) for name in means.sums}
    out["bits_per_dim"] = means.bits_per_dim("neg_elbo", model.cfg.num_dims)
    return out


def lr_factor(cfg: TrainConfig, state: TrainState, elapsed: float) -> float:
    """Multiplier of ``cfg.lr`` for the next step. ``cosine`` follows the further of two clocks:
    epochs done (once an epoch's length is known) and, with a time limit, wall time, so that the
    rate reaches its floor when either runs out."""
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = 0.0
    if state.steps_per_epoch:
        progress = (state.epoch + state.step_in_epoch / state.steps_per_epoch) / cfg.epochs
    if cfg.time_limit:
        progress = max(progress, elapsed / cfg.time_limit)
    progress = min(max(progress, 0.0), 1.0)
    return cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _write_jsonl(url: str, lines: list[dict], storage_options: StorageOptions) -> None:
    atomic_write_bytes(url, "".join(json.dumps(line) + "\n" for line in lines).encode(), storage_options)


def _meta(session: Session, state: TrainState, val: dict) -> dict:
    cfg = session.cfg
    return {"data_url": cfg.data_url, "data_fingerprint": session.data_fp, "val_url": cfg.val_url,
            "val_fraction": None if cfg.val_url else cfg.val_fraction, "epochs": state.epoch,
            "steps": state.step, "val_neg_elbo": val["neg_elbo"], "val_bits_per_dim": val["bits_per_dim"],
            "val_recon_nll": val["recon_nll"], "val_kl": val["kl"], "seed": cfg.seed, "precision": session.precision,
            "resize": cfg.resize,  # pipeline.options.trained_resize: embed decodes with it by default
            "train_config": {k: v for k, v in asdict(cfg).items() if k not in ("storage_options", "model")}}


def _epoch_grid(session: Session, epoch: int) -> None:
    """Prior samples (two rows) over validation images and their reconstructions."""
    model, device, n = session.model, session.device, 8
    model.eval()
    samples = model.sample(2 * n, generator=torch.Generator(device=device).manual_seed(session.cfg.seed))
    real = session.x_val[:n].to(device)
    save_grid(torch.cat([samples, real, model.reconstruct(real)]).cpu(), session.url(f".epoch{epoch:03d}.png"),
              nrow=n, storage_options=session.cfg.storage_options)


def publish_calibrated(cfg: TrainConfig, x_val: torch.Tensor, device: torch.device) -> str:
    """Calibrate the best model (the staging sidecar) on validation images (each score's
    quantiles and the typicality reference) and write it to ``cfg.out`` in one atomic step."""
    so = cfg.storage_options
    best_url = cfg.out + BEST
    if not exists(best_url, so):
        if not (cfg.resume and exists(cfg.out, so)):  # a run of an earlier vaepipe wrote the best model to OUT
            raise VaePipeError(f"{best_url}: the best checkpoint so far is missing (deleted?); "
                               "train again without --resume")
        best_url = cfg.out
    source = cfg.val_url or f"{cfg.data_url} (validation split {cfg.val_fraction:g})"
    return store_calibration(best_url, x_val[:cfg.quantile_images], source, cfg.quantile_iwae_k, cfg.seed, device,
                             so, out_url=cfg.out)["model_id"]
