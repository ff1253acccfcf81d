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
"""
from __future__ import annotations

import io
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader

from jobs.calibrate import MIN_IMAGES, store_calibration
from jobs.data import ShardImageDataset, fingerprint, list_specs, load_tensor
from jobs.grid import save_grid
from vae_model import losses
from vae_model.checkpoint import save_checkpoint
from vae_model.config import VAEConfig
from vae_model.errors import ConfigError, StorageError, VaePipeError
from vae_model.model import VAE
from vae_model.runtime import tune_allocator
from vae_model.storage import StorageOptions, atomic_write_bytes, exists, get_fs, read_bytes

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

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.epochs < 1:
            raise ConfigError("--batch-size and --epochs must be >= 1")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"--lr-schedule must be constant or cosine, not {self.lr_schedule!r}")
        if self.grad_clip < 0 or not (self.grad_clip_factor == 0 or self.grad_clip_factor >= 1):
            raise ConfigError("--grad-clip must be >= 0 and --grad-clip-factor 0 (off) or >= 1")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError("--val-fraction must be in [0, 1)")
        if self.val_url is None and self.val_fraction == 0:
            raise ConfigError("validation data is needed for best-checkpoint selection: give --val URL or "
                              "--val-fraction > 0")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"--precision must be auto, fp32 or bf16, not {self.precision!r}")
        if min(self.val_limit, self.quantile_images) < MIN_IMAGES:
            raise ConfigError(f"val_limit={self.val_limit} and quantile_images={self.quantile_images} must be "
                              f">= {MIN_IMAGES}: calibration needs that many validation images")
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


def pick_precision(requested: str, device: torch.device) -> str:
    """bf16 autocast where the hardware has fast bf16 (CUDA, or CPUs with AMX/AVX512-BF16)."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    cpu = torch.cpu
    fast_bf16 = any(getattr(cpu, name, lambda: False)() for name in
                    ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return "bf16" if fast_bf16 else "fp32"


def _sidecar(out: str, suffix: str) -> str:
    return out + suffix


BEST = ".best.safetensors"  # the staging sidecar (module docstring)


def _write_jsonl(url: str, lines: list[dict], storage_options: StorageOptions) -> None:
    atomic_write_bytes(url, ("".join(json.dumps(l) + "\n" for l in lines)).encode(), storage_options)


def _save_resume(url: str, state: dict, storage_options: StorageOptions) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(url, buf.getvalue(), storage_options)


# What _resume_payload writes: key -> type. ``state`` is JSON holding at least STATE_KEYS.
RESUME_KEYS: dict[str, type] = {"model": dict, "optimizer": dict, "rng": dict, "model_config": dict, "state": str}
STATE_KEYS: dict[str, tuple[type, ...]] = {"epoch": (int,), "step": (int,), "step_in_epoch": (int,),
                                           "best": (int, float), "bad_epochs": (int,), "history": (list,)}


def _bad_resume(url: str, why: str) -> VaePipeError:
    return VaePipeError(f"{url}: not a usable resume state ({why}); delete it to start afresh")


def _load_resume(url: str, storage_options: StorageOptions) -> dict:
    """The resume state at ``url``, its structure checked (not its tensors: :func:`_apply_resume`)."""
    try:
        # weights_only: tensors, numbers, strings and containers only; nothing is unpickled.
        saved = torch.load(io.BytesIO(read_bytes(url, storage_options)), weights_only=True)
    except StorageError:
        raise
    except Exception as exc:
        raise VaePipeError(f"{url}: unreadable resume state ({type(exc).__name__}); delete it to start afresh") from None
    if not isinstance(saved, dict):
        raise _bad_resume(url, f"a {type(saved).__name__}, not a dict")
    missing = [k for k in RESUME_KEYS if k not in saved]
    if missing:
        raise _bad_resume(url, f"missing {', '.join(missing)}")
    wrong = next((k for k, t in RESUME_KEYS.items() if not isinstance(saved[k], t)), None)
    if wrong:
        raise _bad_resume(url, f"{wrong} must be {RESUME_KEYS[wrong].__name__}, not {type(saved[wrong]).__name__}")
    if not all(isinstance(saved["rng"].get(k), torch.Tensor) for k in ("gen", "torch")):
        raise _bad_resume(url, "rng lacks the gen and torch generator states")
    try:
        state = json.loads(saved["state"])
    except json.JSONDecodeError:
        raise _bad_resume(url, "state is not JSON") from None
    if not isinstance(state, dict):
        raise _bad_resume(url, "state is not a JSON object")
    wrong = next((k for k, t in STATE_KEYS.items()
                  if not isinstance(state.get(k), t) or isinstance(state.get(k), bool)), None)
    if wrong:
        raise _bad_resume(url, f"state.{wrong} is missing or not {'/'.join(t.__name__ for t in STATE_KEYS[wrong])}")
    saved["state"] = state
    return saved


def _apply_resume(url: str, saved: dict, model: VAE, opt: torch.optim.Optimizer, gen: torch.Generator,
                  model_cfg: VAEConfig) -> dict:
    """Restore weights, optimiser and RNGs from a :func:`_load_resume` state; returns the loop state."""
    if saved["model_config"] != model_cfg.to_dict():
        raise ConfigError(f"{url} was written for a different model config; drop --resume or match flags")
    try:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        gen.set_state(saved["rng"]["gen"])
        torch.set_rng_state(saved["rng"]["torch"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
        first = (str(exc).splitlines() or [""])[0][:200]
        raise _bad_resume(url, f"weights, optimiser or RNG do not fit: {type(exc).__name__} {first}") from None
    return saved["state"]


@torch.no_grad()
def evaluate_tensor(model: VAE, x: torch.Tensor, batch_size: int, seed: int, precision: str = "fp32",
                    device: torch.device = torch.device("cpu")) -> dict[str, float]:
    """Mean -ELBO (nats), bits/dim, recon and KL over a uint8 tensor; deterministic given seed.

    Bernoulli models are scored on a seeded stochastic binarisation, the protocol ``vaepipe
    evaluate`` uses for dynamically binarised data (a 0.5 threshold gives much easier images)."""
    model.eval()
    g = torch.Generator(device=device).manual_seed(seed)
    binarize = g if model.cfg.likelihood == "bernoulli" else None
    sums = {"neg_elbo": 0.0, "recon_nll": 0.0, "kl": 0.0}
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device)
        eps = torch.randn((len(xb), model.cfg.latent_dim), generator=g, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            t = model.elbo(xb, generator=binarize, eps=eps)
        sums["neg_elbo"] += t.neg_elbo.sum().item()
        sums["recon_nll"] += t.recon_nll.sum().item()
        sums["kl"] += t.kl.sum().item()
    n = max(len(x), 1)
    out = {k: v / n for k, v in sums.items()}
    out["bits_per_dim"] = out["neg_elbo"] / (model.cfg.num_dims * math.log(2))
    return out


def lr_factor(cfg: TrainConfig, state: dict, elapsed: float) -> float:
    """Multiplier of ``cfg.lr`` for the next step. ``cosine`` follows the further of two clocks:
    epochs done (once an epoch's length is known) and, with a time limit, wall time, so that the
    rate reaches its floor when either runs out."""
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = 0.0
    if state.get("steps_per_epoch"):
        progress = (state["epoch"] + state["step_in_epoch"] / state["steps_per_epoch"]) / cfg.epochs
    if cfg.time_limit:
        progress = max(progress, elapsed / cfg.time_limit)
    progress = min(max(progress, 0.0), 1.0)
    return cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _epoch_batches(cache: torch.Tensor, batch_size: int, seed: int, epoch: int):
    """Batches of the in-memory training split in a fresh order per (seed, epoch)."""
    perm = torch.randperm(len(cache), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    for i in range(0, len(cache), batch_size):
        yield cache[perm[i:i + batch_size]]


def _fill_cache(train_ds: ShardImageDataset, loader_kw: dict, budget: int) -> torch.Tensor | None:
    """Replay epoch 1's stream into memory (resume after epoch 1 needs the same images in the same order)."""
    train_ds.set_epoch(0)
    parts, size = [], 0
    for x in DataLoader(train_ds, **loader_kw):
        parts.append(x)
        size += x.numel()
        if size > budget:
            return None
    return torch.cat(parts) if parts else None


GRAD_WINDOW = 100  # recent gradient norms the adaptive limit looks at


def grad_limit(cfg: TrainConfig, recent: list[float]) -> float:
    """The gradient-norm limit for the next step: the tighter of the absolute ``grad_clip`` and
    ``grad_clip_factor`` x the median of recent norms; ``inf`` when neither applies.

    The adaptive limit only catches spikes: the norm's scale depends on the likelihood and the
    image size (a fixed limit of 200 bound in most early steps of an 8-bit Fashion-MNIST model and
    cost ~1.5% held-out -ELBO after 200 steps, benchmarks/train_speed.py), its median does not."""
    limit = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    if cfg.grad_clip_factor > 0 and recent:
        limit = min(limit, cfg.grad_clip_factor * sorted(recent)[len(recent) // 2])
    return limit


def clipped_step(model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig, state: dict) -> tuple[float, float]:
    """Clip the gradients (see :func:`grad_limit`) and step the optimiser; a non-finite gradient
    norm (e.g. a bf16 overflow) skips the update instead of poisoning the weights.
    Updates ``state`` (recent norms, clipped and skipped counts); returns (norm, limit)."""
    limit = grad_limit(cfg, state["grad_norms"])
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), limit).item()
    if math.isfinite(norm):
        opt.step()
        state["grad_norms"] = (state["grad_norms"] + [norm])[-GRAD_WINDOW:]
        state["clipped"] += int(norm > limit)
    else:
        state["skipped"] += 1
        log.warning("step %d: non-finite gradient norm, update skipped", state["step"] + 1)
    return norm, limit


def _rng_state(gen: torch.Generator) -> dict:
    return {"gen": gen.get_state(), "torch": torch.get_rng_state()}


def train(cfg: TrainConfig, progress: bool = True,
          on_epoch: Callable[[dict], None] | None = None) -> TrainResult:
    """Train a VAE on ``cfg.data_url`` and write the best checkpoint to ``cfg.out``."""
    t_start = time.monotonic()
    tune_allocator()  # reuse activation memory between steps (~1.25x fp32 steps on this CPU)
    so = cfg.storage_options
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = pick_precision(cfg.precision, device)  # options were checked by TrainConfig
    get_fs(cfg.out, so)  # fail early on an unusable output URL

    model_cfg = VAEConfig.default_for(cfg.model.get("image_size", 28), cfg.model.get("channels", 1),
                                      **{k: v for k, v in cfg.model.items() if k not in ("image_size", "channels")})
    specs = list_specs(cfg.data_url, so)
    val_specs = list_specs(cfg.val_url, so) if cfg.val_url else specs
    data_fp = fingerprint(specs, so)

    common = dict(channels=model_cfg.channels, size=model_cfg.image_size, seed=cfg.seed, storage_options=so)
    if cfg.val_url:
        train_ds = ShardImageDataset(specs, split="all", shuffle_buffer=cfg.shuffle_buffer, **common)
        val_ds = ShardImageDataset(val_specs, split="all", **common)
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
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)  # ~1.7 s cold
    gen = torch.Generator(device=device).manual_seed(cfg.seed)

    state = {"epoch": 0, "step": 0, "step_in_epoch": 0, "best": math.inf, "best_bpd": math.inf,
             "bad_epochs": 0, "grad_norms": [], "clipped": 0, "skipped": 0, "history": []}
    resume_url = _sidecar(cfg.out, ".resume.pt")
    best_url = _sidecar(cfg.out, BEST)
    if cfg.resume and exists(resume_url, so):
        state.update(_apply_resume(resume_url, _load_resume(resume_url, so), model, opt, gen, model_cfg))
        log.info("resumed from %s at epoch %d step %d", resume_url, state["epoch"], state["step"])
    metrics: list[dict] = state.pop("history")

    loader_kw = dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers, drop_last=False,
                     persistent_workers=False, pin_memory=device.type == "cuda")
    stopped = "epochs"
    from tqdm.auto import tqdm

    # Epoch 1 streams and decodes the shards; when the decoded split fits in cfg.cache_bytes it is
    # kept, and later epochs draw shuffled batches from memory (no decoding on the training cores).
    cache: torch.Tensor | None = None
    if state["epoch"] > 0 and state.get("cached"):
        cache = _fill_cache(train_ds, loader_kw, cfg.cache_bytes)
    while state["epoch"] < cfg.epochs:
        epoch = state["epoch"]
        train_ds.set_epoch(epoch)
        model.train()
        skip = state["step_in_epoch"]
        seen, t0, sum_loss, n_loss = 0, time.monotonic(), 0.0, 0
        collecting: list[torch.Tensor] | None = [] if cache is None and epoch == 0 and cfg.cache_bytes > 0 else None
        collected = 0
        batches = (_epoch_batches(cache, cfg.batch_size, cfg.seed, epoch) if cache is not None
                   else DataLoader(train_ds, **loader_kw))
        bar = tqdm(desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="img", disable=not progress, leave=False)
        for i, x in enumerate(batches):
            if collecting is not None:
                collecting.append(x)
                collected += x.numel()
                if collected > cfg.cache_bytes:
                    collecting = None
            if i < skip:  # exact resume: replay the data order, skip what was already trained on
                continue
            x = x.to(device, non_blocking=True)
            for group in opt.param_groups:
                group["lr"] = cfg.lr * lr_factor(cfg, state, time.monotonic() - t_start)
            beta = losses.kl_warmup_weight(state["step"], cfg.kl_warmup_steps, model_cfg.beta)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                terms = model(x, generator=gen)
            loss = losses.negative_elbo(terms.recon_nll, terms.kl, beta).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm, limit = clipped_step(model, opt, cfg, state)
            state["step"] += 1
            state["step_in_epoch"] = i + 1
            seen += len(x)
            sum_loss += terms.neg_elbo.sum().item()
            n_loss += len(x)
            rate = seen / max(time.monotonic() - t0, 1e-9)
            bar.update(len(x))
            bar.set_postfix(loss=f"{loss.item():.1f}", elbo=f"{-terms.neg_elbo.mean().item():.1f}",
                            img_s=f"{rate:.0f}")
            if state["step"] % cfg.log_every == 0:
                metrics.append({"event": "step", "epoch": epoch, "step": state["step"], "loss": loss.item(),
                                "neg_elbo": terms.neg_elbo.mean().item(), "kl": terms.kl.mean().item(),
                                "beta": beta, "img_per_s": rate, "grad_norm": norm, "grad_limit": limit if math.isfinite(limit) else None,
                                "clipped_steps": state["clipped"], "skipped_steps": state["skipped"]})
            if cfg.time_limit is not None and time.monotonic() - t_start > cfg.time_limit:
                stopped = "time_limit"
                break
        bar.close()
        if stopped == "time_limit":
            _save_resume(resume_url, _resume_payload(model, opt, gen, model_cfg, state, metrics), so)
            break
        if epoch == 0:
            state["steps_per_epoch"] = state["step_in_epoch"]
            if collecting:
                cache = torch.cat(collecting)
            state["cached"] = cache is not None
        val = evaluate_tensor(model, x_val, 512, cfg.seed, precision="fp32", device=device)
        state["epoch"] += 1
        state["step_in_epoch"] = 0
        rec = {"event": "epoch", "epoch": state["epoch"], "step": state["step"],
               "train_neg_elbo": sum_loss / max(n_loss, 1), "val_neg_elbo": val["neg_elbo"],
               "val_bits_per_dim": val["bits_per_dim"], "val_recon_nll": val["recon_nll"], "val_kl": val["kl"],
               "img_per_s": seen / max(time.monotonic() - t0, 1e-9), "precision": precision,
               "lr": opt.param_groups[0]["lr"], "clipped_steps": state["clipped"], "skipped_steps": state["skipped"],
               "data": "memory" if epoch > 0 and cache is not None else "stream",
               "elapsed_s": time.monotonic() - t_start}
        metrics.append(rec)
        improved = val["neg_elbo"] < state["best"]
        if improved:
            state["best"], state["best_bpd"], state["bad_epochs"] = val["neg_elbo"], val["bits_per_dim"], 0
            save_checkpoint(model, best_url, _meta(cfg, model_cfg, data_fp, state, val, precision), so)
        else:
            state["bad_epochs"] += 1
        _save_resume(resume_url, _resume_payload(model, opt, gen, model_cfg, state, metrics), so)
        _write_jsonl(_sidecar(cfg.out, ".metrics.jsonl"), metrics, so)
        _epoch_grid(model, x_val, cfg, state["epoch"], device)
        if progress:
            tqdm.write(f"epoch {state['epoch']}: val -ELBO {val['neg_elbo']:.2f} nats "
                     f"({val['bits_per_dim']:.4f} bits/dim){' *' if improved else ''}")
        if on_epoch:
            on_epoch(rec)
        if state["bad_epochs"] >= cfg.patience:
            stopped = "early_stopping"
            break
    _write_jsonl(_sidecar(cfg.out, ".metrics.jsonl"), metrics, so)
    if not math.isfinite(state["best"]):
        raise VaePipeError("training stopped before the first epoch finished (time limit?): no checkpoint written; "
                           "rerun with --resume to continue")
    model_id = publish_calibrated(cfg, x_val, device)
    return TrainResult(cfg.out, model_id, state["epoch"], state["step"], state["best"], state["best_bpd"],
                       stopped, time.monotonic() - t_start)


def _resume_payload(model, opt, gen, model_cfg: VAEConfig, state: dict, metrics: list[dict]) -> dict:
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": _rng_state(gen),
            "model_config": model_cfg.to_dict(), "state": json.dumps({**state, "history": metrics})}


def _meta(cfg: TrainConfig, model_cfg: VAEConfig, data_fp: str, state: dict, val: dict, precision: str) -> dict:
    return {"data_url": cfg.data_url, "data_fingerprint": data_fp, "val_url": cfg.val_url,
            "val_fraction": None if cfg.val_url else cfg.val_fraction, "epochs": state["epoch"],
            "steps": state["step"], "val_neg_elbo": val["neg_elbo"], "val_bits_per_dim": val["bits_per_dim"],
            "val_recon_nll": val["recon_nll"], "val_kl": val["kl"], "seed": cfg.seed, "precision": precision,
            "train_config": {k: v for k, v in asdict(cfg).items() if k not in ("storage_options", "model")}}


def _epoch_grid(model: VAE, x_val: torch.Tensor, cfg: TrainConfig, epoch: int, device: torch.device) -> None:
    model.eval()
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    n = 8
    samples = model.sample(2 * n, generator=g)
    real = x_val[:n].to(device)
    recon = model.reconstruct(real)
    save_grid(torch.cat([samples, real, recon]).cpu(), _sidecar(cfg.out, f".epoch{epoch:03d}.png"), nrow=n,
              storage_options=cfg.storage_options)


def publish_calibrated(cfg: TrainConfig, x_val: torch.Tensor, device: torch.device) -> str:
    """Calibrate the best model (the staging sidecar) on validation images (each score's
    quantiles and the typicality reference) and write it to ``cfg.out`` in one atomic step."""
    so = cfg.storage_options
    best_url = _sidecar(cfg.out, BEST)
    if not exists(best_url, so):
        if not (cfg.resume and exists(cfg.out, so)):  # a run of an earlier vaepipe wrote the best model to OUT
            raise VaePipeError(f"{best_url}: the best checkpoint so far is missing (deleted?); "
                               "train again without --resume")
        best_url = cfg.out
    source = cfg.val_url or f"{cfg.data_url} (validation split {cfg.val_fraction:g})"
    return store_calibration(best_url, x_val[:cfg.quantile_images], source, cfg.quantile_iwae_k, cfg.seed, device,
                             so, out_url=cfg.out)["model_id"]
