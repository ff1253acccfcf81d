"""The ``vaepipe`` command line: each command parses its flags and calls one library function.

Library errors (:class:`VaePipeError`) become one-line messages and exit status 1; set
``VAEPIPE_DEBUG=1`` to see full tracebacks instead.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import sys
from typing import Any, Callable

import click

from jobs.log_format import LOG_FORMATS, TEXT_FORMAT, formatter
from pipeline.options import DEFAULT_RESIZE, RESIZE_POLICIES
from vae_model.config import ARCHS, LIKELIHOODS
from vae_model.device import PRECISIONS
from vae_model.errors import VaePipeError, worker_failure
from vae_model.runtime import skip_exit_gc
from vae_model.storage import parse_storage_options


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def handle_errors(fn: Callable) -> Callable:
    """Turn library and storage errors into a one-line ``Error: ...`` and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if os.environ.get("VAEPIPE_DEBUG"):
            return fn(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            raise click.Abort() from None
        except Exception as exc:
            raise _one_line_error(exc) from None

    return wrapper


def _one_line_error(exc: Exception) -> click.ClickException:
    cause = worker_failure(exc)  # a pipeline worker's failure, however the runner wrapped it
    if cause is not None:
        return click.ClickException(cause)
    if isinstance(exc, VaePipeError):
        return click.ClickException(_one_line(exc))
    if isinstance(exc, (OSError, ValueError)):
        return click.ClickException(f"{type(exc).__name__}: {_one_line(exc)}")
    # a bug: still one line, with a way to get the trace
    return click.ClickException(f"internal error {type(exc).__name__}: {_one_line(exc)} "
                                "(rerun with VAEPIPE_DEBUG=1 for the traceback)")


def storage_option(fn: Callable) -> Callable:
    return click.option("--storage-options", "storage_options", default=None, metavar="JSON",
                        help="fsspec storage options as a JSON object, e.g. "
                             "'{\"client_kwargs\": {\"endpoint_url\": \"http://127.0.0.1:8333\"}}'. "
                             "Credentials and endpoints are also read from the usual env vars "
                             "(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).")(fn)


def _so(text: str | None) -> dict | None:
    return parse_storage_options(text) or None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="vaepipe", message="vaepipe %(version)s")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.option("--log-format", type=click.Choice(LOG_FORMATS), default="text", show_default=True,
              help="json: one JSON object a line (ts, level, logger, message, pid), for log collectors.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, log_format: str) -> None:
    """vaepipe: train a convolutional VAE on image shards, embed and anomaly-score images with
    Apache Beam, and generate images.

    \b
    Example:
      vaepipe shards data/train-images-idx3-ubyte.gz shards/ --shard-size 5000
      vaepipe train shards/ --out runs/fmnist/model.safetensors --epochs 5
      vaepipe evaluate shards/ --checkpoint runs/fmnist/model.safetensors
    """
    skip_exit_gc()  # no interpreter-exit GC walk over the heap torch/Beam leave (vae_model.runtime)
    ctx.ensure_object(dict)["log_format"] = log_format
    logging.captureWarnings(log_format == "json")  # Python warnings become JSON log lines too
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format=TEXT_FORMAT)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_drop_import_noise)
        handler.setFormatter(formatter(log_format))


def _drop_import_noise(record: logging.LogRecord) -> bool:
    # apache_beam logs this at import time when the optional GCP client libraries are absent.
    return not str(record.msg).startswith("apitools not found")


@cli.command()
@click.argument("source")
@click.argument("out_url")
@click.option("--format", "fmt", type=click.Choice(["tar", "parquet"]), default="tar", show_default=True,
              help="Shard format: WebDataset-style tar or Parquet (key, image bytes, label).")
@click.option("--shard-size", default=1000, show_default=True, help="Images per shard.")
@click.option("--limit", type=int, default=None, help="Convert at most this many images.")
@storage_option
@handle_errors
def shards(source: str, out_url: str, fmt: str, shard_size: int, limit: int | None,
           storage_options: str | None) -> None:
    """Convert images into shards at OUT_URL.

    SOURCE is an IDX images file (*-idx3-ubyte, optionally .gz; the labels file beside it is
    stored as labels) or a folder/prefix/glob of image files (copied byte for byte).

    \b
    Example:
      vaepipe shards /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz \\
          s3://bucket/fmnist/train/ --format tar --shard-size 5000
    """
    from tqdm.auto import tqdm

    from pipeline.convert import write_shards

    if shard_size < 1:
        raise click.BadParameter("must be >= 1", param_hint="--shard-size")
    with tqdm(unit="img", desc="shards", file=sys.stderr) as bar:
        urls = write_shards(source, out_url, fmt=fmt, shard_size=shard_size, limit=limit,
                            storage_options=_so(storage_options), progress=bar.update)
        images = bar.n
    click.echo(json.dumps({"shards": len(urls), "images": images, "out": out_url}))


@cli.command()
@click.argument("data_url")
@click.option("--out", "out", required=True, help="Checkpoint URL to write (e.g. runs/x/model.safetensors).")
@click.option("--val", "val_url", default=None, help="Validation data URL (default: a hash split of DATA_URL).")
@click.option("--val-fraction", default=0.05, show_default=True, help="Fraction of DATA_URL held out when --val is not given.")
@click.option("--epochs", default=10, show_default=True)
@click.option("--time-limit", type=float, default=None, help="Stop after this many seconds (resumable).")
@click.option("--image-size", default=28, show_default=True, help="Images are resized/cropped to this square size.")
@click.option("--channels", type=click.IntRange(1, 3), default=1, show_default=True, help="1 (grayscale) or 3 (RGB).")
@click.option("--resize", type=click.Choice(RESIZE_POLICIES), default=DEFAULT_RESIZE, show_default=True,
              help="How a non-square image becomes square: shorter side to --image-size and the centre kept, longer "
                   "side to size with white margins, or both sides to size. Stored in the checkpoint: embed uses it.")
@click.option("--latent-dim", type=int, default=None, help="Size of z (default: 32; 128 for RGB at 32 px and up).")
@click.option("--widths", default=None, help="Conv channels per level, comma separated (default by image size).")
@click.option("--hidden-dim", type=int, default=None, help="Fully connected layer size (default: 256; 512 for RGB photos).")
@click.option("--likelihood", type=click.Choice(LIKELIHOODS), default=None,
              help="Pixel model: discretized_logistic (default for greyscale), logistic_mixture (channel-coupled "
                   "mixture, default for RGB at 32 px and up), or bernoulli (dynamic binarisation).")
@click.option("--arch", type=click.Choice(ARCHS), default=None,
              help="Conv trunk: plain (default) or resnet (GroupNorm residual blocks).")
@click.option("--blocks", type=click.IntRange(1, 8), default=None, help="Residual blocks per level (resnet; default 1).")
@click.option("--mixtures", type=click.IntRange(1, 32), default=None, help="Logistic components (logistic_mixture; default 5).")
@click.option("--context-layers", type=click.IntRange(0, 8), default=None,
              help="A local autoregressive pixel context with this many masked conv layers (0: none, the default): "
                   "each pixel's likelihood also sees its causal neighbours. Tighter bits/dim on photos; sampling and "
                   "reconstruction become sequential over the pixels.")
@click.option("--context-width", type=click.IntRange(1, 1024), default=None, help="Channels of the pixel context (default 64).")
@click.option("--beta", default=1.0, show_default=True, help="KL weight (1.0 = true ELBO).")
@click.option("--kl-warmup-steps", default=1000, show_default=True)
@click.option("--free-bits", default=0.0, show_default=True,
              help="Free bits (nats per latent dimension) in the training loss: keeps the latent in use when the "
                   "decoder could model the pixels alone (--context-layers). Reported figures stay the true ELBO.")
@click.option("--batch-size", default=128, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default="constant", show_default=True,
              help="cosine: decay to 2% of --lr by the last epoch or the --time-limit, whichever comes first.")
@click.option("--cache-mb", default=1024, show_default=True,
              help="Keep the decoded training images in memory after epoch 1 when they fit in this many MB (0: always stream).")
@click.option("--grad-clip", default=0.0, show_default=True, help="Clip the gradient norm at this value (0: no fixed limit).")
@click.option("--grad-clip-factor", default=5.0, show_default=True,
              help="Clip the gradient norm at this multiple of the median of the last 100 norms (0: off).")
@click.option("--patience", default=5, show_default=True, help="Early stopping: epochs without validation improvement.")
@click.option("--seed", default=0, show_default=True)
@click.option("--num-workers", default=1, show_default=True, help="DataLoader processes streaming shards.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="auto: bf16 autocast on CUDA and on CPUs with fast bf16 (AMX/AVX512-BF16), else fp32.")
@click.option("--resume", is_flag=True, help="Continue from OUT.resume.pt exactly where it stopped.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@storage_option
@handle_errors
def train(data_url: str, out: str, val_url: str | None, val_fraction: float, epochs: int, time_limit: float | None,
          image_size: int, channels: int, latent_dim: int | None, widths: str | None, hidden_dim: int | None,
          likelihood: str | None, arch: str | None, blocks: int | None, mixtures: int | None,
          context_layers: int | None, context_width: int | None, beta: float, kl_warmup_steps: int, free_bits: float,
          batch_size: int, lr: float, lr_schedule: str, cache_mb: int,
          grad_clip: float, grad_clip_factor: float, patience: int, seed: int, num_workers: int, precision: str,
          resume: bool, quiet: bool, storage_options: str | None, resize: str) -> None:
    """Train a VAE on the shards at DATA_URL; write the best checkpoint to --out.

    Beside the checkpoint: OUT.metrics.jsonl, OUT.epochNNN.png (samples and reconstructions)
    and OUT.resume.pt. Prints a JSON summary.

    \b
    Example:
      vaepipe train s3://bucket/fmnist/train/ --out s3://bucket/models/fmnist.safetensors \\
          --epochs 20 --latent-dim 32 --likelihood discretized_logistic
    """
    from jobs.train import TrainConfig
    from jobs.train import train as run_train

    if channels == 2:
        raise click.BadParameter("use 1 (grayscale) or 3 (RGB)", param_hint="--channels")
    model: dict[str, Any] = dict(image_size=image_size, channels=channels, beta=beta)
    given = dict(latent_dim=latent_dim, hidden_dim=hidden_dim, likelihood=likelihood, arch=arch, blocks=blocks,
                 mixtures=mixtures, context_layers=context_layers, context_width=context_width)
    model.update({k: v for k, v in given.items() if v is not None})  # the rest: VAEConfig.default_for
    if widths:
        try:
            model["widths"] = tuple(int(w) for w in widths.split(","))
        except ValueError:
            raise click.BadParameter("comma-separated integers, e.g. 32,64", param_hint="--widths") from None
    cfg = TrainConfig(data_url=data_url, out=out, val_url=val_url, val_fraction=val_fraction, epochs=epochs,
                      time_limit=time_limit, batch_size=batch_size, lr=lr, lr_schedule=lr_schedule,
                      cache_bytes=max(cache_mb, 0) << 20, kl_warmup_steps=kl_warmup_steps, free_bits=free_bits,
                      grad_clip=grad_clip, grad_clip_factor=grad_clip_factor,
                      patience=patience, seed=seed, num_workers=num_workers, precision=precision, resume=resume,
                      model=model, storage_options=_so(storage_options), resize=resize)
    result = run_train(cfg, progress=not quiet)
    click.echo(json.dumps(result.__dict__))


@cli.command()
@click.argument("checkpoint_url")
@click.argument("data_url")
@click.option("--limit", type=int, default=10000, show_default=True, help="Use at most this many images.")
@click.option("--iwae-k", type=click.IntRange(1, 10000), default=16, show_default=True,
              help="Importance samples for the iwae score's quantiles.")
@click.option("--seed", default=0, show_default=True)
# the rules of vae_model.combine.RULES, listed here so that parsing flags imports no numpy (tests/test_cli.py)
@click.option("--rule", type=click.Choice(["fisher", "tpm", "minp", "hmp", "copula"]), default=None,
              help="How the typicality score combines its statistics (default fisher, the anomaly battery's choice: "
                   "README, 'Anomaly scores'); copula also flags images too typical for a statistic.")
@click.option("--statistics", default=None, metavar="A,B,..",
              help="Which statistics it combines, among nll_bits, complexity, kde, knn, knn10, nll_bits_2s, complexity_2s "
                   "(default nll_bits,complexity,kde,knn).")
@storage_option
@handle_errors
def calibrate(checkpoint_url: str, data_url: str, limit: int, iwae_k: int, seed: int, rule: str | None,
              statistics: str | None, storage_options: str | None) -> None:
    """Refit a checkpoint's score quantiles and typicality reference on DATA_URL.

    DATA_URL should hold normal images the model was not trained on (a few thousand: the
    typicality score sharpens with more). The weights and model_id are unchanged; embed outputs
    record the calibration, so rerunning embed rescores. Prints the calibration record.

    \b
    Example:
      vaepipe calibrate runs/m.safetensors s3://bucket/fmnist/holdout/ --limit 8000
    """
    from jobs.calibrate import calibrate as run_calibrate
    from vae_model.combine import DEFAULT_RULE
    from vae_model.typicality import ALL_STATISTICS

    if limit is not None and limit < 1:
        raise click.BadParameter("must be >= 1", param_hint="--limit")
    uses = None
    if statistics is not None:
        uses = tuple(s.strip() for s in statistics.split(",") if s.strip())
        unknown = [s for s in uses if s not in ALL_STATISTICS]
        if not uses or unknown:
            raise click.BadParameter(f"{statistics!r}: name some of {', '.join(ALL_STATISTICS)}",
                                     param_hint="--statistics")
    click.echo(json.dumps(run_calibrate(checkpoint_url, data_url, limit, iwae_k, seed, _so(storage_options),
                                        rule=rule or DEFAULT_RULE, uses=uses)))


@cli.command()
@click.argument("checkpoint_url")
@click.option("--out", "out", required=True, help="PNG grid URL to write.")
@click.option("--n", default=64, show_default=True, help="Images (samples, reconstructions, or interpolation rows).")
@click.option("--seed", default=0, show_default=True)
@click.option("--temperature", default=1.0, show_default=True, help="Prior scale: <1 gives cleaner, less varied samples.")
@click.option("--stochastic", is_flag=True,
              help="Prior samples: draw every pixel from p(x|z) instead of showing its mean (texture; with a pixel "
                   "context, ancestral sampling in raster order).")
@click.option("--reconstruct", "reconstruct_url", default=None, metavar="DATA_URL",
              help="Instead of sampling: images from DATA_URL above their reconstructions.")
@click.option("--interpolate", is_flag=True, help="Instead of sampling: rows of latent interpolations.")
@click.option("--data", "data_url", default=None, help="With --interpolate: interpolate between pairs of these images.")
@click.option("--steps", default=10, show_default=True, help="With --interpolate: images per row.")
@click.option("--scale", type=click.IntRange(1, 16), default=1, show_default=True,
              help="Enlarge each tile this many times (nearest neighbour), e.g. 3 for 32 px photos.")
@storage_option
@handle_errors
def generate(checkpoint_url: str, out: str, n: int, seed: int, temperature: float, stochastic: bool,
             reconstruct_url: str | None,
             interpolate: bool, data_url: str | None, steps: int, scale: int, storage_options: str | None) -> None:
    """Generate images from a checkpoint into a PNG grid.

    \b
    Examples:
      vaepipe generate runs/m.safetensors --out samples.png --n 64 --temperature 0.8
      vaepipe generate runs/m.safetensors --out recon.png --reconstruct shards/ --n 32
      vaepipe generate runs/m.safetensors --out interp.png --interpolate --data shards/ --n 8
    """
    from jobs import generate as gen

    so = _so(storage_options)
    if reconstruct_url and interpolate:
        raise click.UsageError("choose one of --reconstruct and --interpolate")
    if reconstruct_url:
        count = gen.generate_reconstructions(checkpoint_url, reconstruct_url, out, n=n, storage_options=so, scale=scale)
    elif interpolate:
        count = gen.generate_interpolations(checkpoint_url, out, n=n, steps=steps, seed=seed, data_url=data_url,
                                            storage_options=so, scale=scale)
    else:
        count = gen.generate_samples(checkpoint_url, out, n=n, seed=seed, temperature=temperature,
                                     storage_options=so, scale=scale, stochastic=stochastic)
    click.echo(json.dumps({"out": out, "images": count}))


@cli.command()
@click.argument("data_url")
@click.option("--checkpoint", "checkpoint_url", required=True, help="Checkpoint URL.")
@click.option("--iwae-k", default=100, show_default=True, help="Importance samples for the IWAE bound.")
@click.option("--batch-size", default=256, show_default=True)
@click.option("--limit", type=int, default=None, help="Evaluate at most this many images.")
@click.option("--seed", default=0, show_default=True)
@click.option("--progress", is_flag=True, help="Show a progress bar on stderr.")
@storage_option
@handle_errors
def evaluate(data_url: str, checkpoint_url: str, iwae_k: int, batch_size: int, limit: int | None, seed: int,
             progress: bool, storage_options: str | None) -> None:
    """Print one JSON object: images, mean ELBO, IWAE-k NLL (nats) and bits/dim.

    \b
    Example:
      vaepipe evaluate shards/test/ --checkpoint runs/m.safetensors --iwae-k 1000
    """
    from jobs.evaluate import EvalOptions
    from jobs.evaluate import evaluate as run_eval

    res = run_eval(data_url, checkpoint_url, EvalOptions(iwae_k=iwae_k, batch_size=batch_size, limit=limit, seed=seed),
                   storage_options=_so(storage_options), progress=progress)
    click.echo(json.dumps(res))


def embed_flags(fn: Callable) -> Callable:
    """The embed run's flags, from the one list in pipeline.options (EMBED_FLAGS)."""
    from pipeline.options import EMBED_FLAGS, REQUIRED_FLAGS, flag_default

    for f in reversed(EMBED_FLAGS):
        default = flag_default(f.field)
        if f.field in REQUIRED_FLAGS:
            fn = click.option(f.flag, f.field, required=True, help=f.help)(fn)
        elif isinstance(default, bool):
            fn = click.option(f"{f.flag}/--no-{f.flag[2:]}", f.field, default=default, show_default=True,
                              help=f.help)(fn)
        else:
            kind = click.Choice(f.choices) if f.choices else type(default) if default is not None else str
            fn = click.option(f.flag, f.field, type=kind, default=default, show_default=default is not None,
                              metavar=f.metavar, help=f.help)(fn)
    return fn


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("data_url")
@embed_flags
@storage_option
@click.pass_context
@handle_errors
def embed(ctx: click.Context, data_url: str, storage_options: str | None, **values: Any) -> None:
    """Embed and anomaly-score every image in the shards at DATA_URL with Apache Beam.

    Writes one zstd Parquet file per input shard under OUT (one row per image), dead letters
    under OUT/errors/, then OUT/_manifest.json and OUT/_SUCCESS. Other flags go to Beam's
    PipelineOptions when Beam knows them (--runner, --direct_num_workers, --dask_client_address,
    ...); any other flag is refused. Locally on a CPU machine it runs min(cores, shards, 8)
    worker processes unless --direct_* flags say otherwise.

    \b
    Example:
      vaepipe embed 's3://bucket/images/*.tar' --checkpoint s3://bucket/m.safetensors \\
          --out s3://bucket/latents/ --run-date 2026-11-28
    """
    from jobs.embed_progress import EmbedProgress
    from pipeline.drift import exit_status, format_drift
    from pipeline.metrics import format_metrics
    from pipeline.options import EmbedOptions
    from pipeline.run import run_embed

    logging.getLogger("pipeline").setLevel(logging.INFO)
    opts = EmbedOptions(**values, storage_options=_so(storage_options))

    with EmbedProgress() as show:
        manifest = run_embed(data_url, opts, list(ctx.args), on_progress=show, use_local_cores=True)
    t = manifest["totals"]
    if ctx.find_root().ensure_object(dict).get("log_format") == "json":  # one JSON line, like every log line
        logging.getLogger("pipeline.run").info("embed finished", extra={
            k: manifest.get(k) for k in ("partition_url", "totals", "images_per_s", "metrics", "drift")})
    else:
        click.echo(format_metrics(manifest.get("metrics", {})), err=True)
        click.echo(format_drift(manifest.get("drift", {})), err=True)
        click.echo(f"{t['shards']} shards ({t['shards_skipped']} skipped), {t['images_seen']} images: "
                   f"{t['rows']} rows, {t['errors']} dead letters, {manifest['images_per_s']} img/s "
                   f"-> {manifest['partition_url']}", err=True)
    if opts.report:
        from pipeline.report import written_report

        click.echo(f"report: {written_report(manifest['partition_url'], opts.storage_options) or 'not written'}",
                   err=True)
    click.echo(json.dumps({**{k: manifest[k] for k in ("partition_url", "model_id", "totals", "reconciled",
                                                       "seconds", "images_per_s", "runner")},
                           "drift": (manifest.get("drift") or {}).get("verdict")}))
    status = exit_status(manifest)  # 3 with --fail-on-drift when a verdict failed: every output is written
    if status:
        ctx.exit(status)


@cli.command("index")
@click.argument("latents_url")
@click.option("--out", "index_url", required=True, help="Index folder URL (index.json and its files are written there).")
@click.option("--metric", type=click.Choice(["cosine", "l2"]), default=None,
              help="Distance (default cosine; an existing index keeps its own).")
@click.option("--kind", type=click.Choice(["flat", "hnsw", "ivf"]), default=None,
              help="flat: exact scan; hnsw: approximate graph, for millions of rows (default); ivf: inverted lists, "
                   "builds ~12x faster, queries ~1.7x slower at equal recall (BENCHMARKS.md). An existing index keeps its own.")
@click.option("--whiten/--no-whiten", default=None,
              help="Whiten the vectors by the first build's mean and covariance before indexing (queries too): "
                   "every latent direction weighs the same (default off; an existing index keeps its own).")
@click.option("--run-date", default=None, metavar="YYYY-MM-DD", help="Add only the partition dt=YYYY-MM-DD.")
@storage_option
@handle_errors
def index_cmd(latents_url: str, index_url: str, metric: str | None, kind: str | None, whiten: bool | None,
              run_date: str | None, storage_options: str | None) -> None:
    """Build a vector index of the embeddings under LATENTS_URL (vaepipe embed's --out), or add
    the partitions it does not hold yet; keys are never added twice, another model is refused.

    \b
    Example:
      vaepipe index s3://bucket/latents/ --out s3://bucket/index/ --run-date 2026-11-28
    """
    from pipeline.index import build_index

    click.echo(json.dumps(build_index(latents_url, index_url, metric=metric, kind=kind, run_date=run_date,
                                      storage_options=_so(storage_options), whiten=whiten)))


@cli.command("search")
@click.argument("index_url")
@click.option("--image", default=None, help="Query image file or URL (encoded with the index's model).")
@click.option("--key", default=None, help="Query by the key of a stored row (it comes back first).")
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(1, 10000), help="Neighbours.")
@click.option("--checkpoint", default=None, help="Checkpoint to encode --image with (default: the index's).")
@click.option("--grid", default=None, help="Also write the query and its neighbours as a PNG here.")
@click.option("--ef-search", default=None, type=int,
              help="hnsw: candidates kept per query (default: the index's, 160 for new indexes); more is slower, "
                   "higher recall.")
@click.option("--nprobe", default=None, type=int, help="ivf: lists scanned per query (default: the index's).")
@storage_option
@handle_errors
def search_cmd(index_url: str, image: str | None, key: str | None, k: int, checkpoint: str | None,
               grid: str | None, ef_search: int | None, nprobe: int | None, storage_options: str | None) -> None:
    """Print the nearest stored rows as JSON lines (key, distance, label, anomaly_score).

    \b
    Example:
      vaepipe search s3://bucket/index/ --image shirt.png -k 10 --grid neighbours.png
    """
    from jobs.search import search

    if (image is None) == (key is None):
        raise click.UsageError("give one of --image and --key")
    for hit in search(index_url, image=image, key=key, k=k, checkpoint=checkpoint, grid=grid,
                      storage_options=_so(storage_options), ef_search=ef_search, nprobe=nprobe):
        click.echo(json.dumps(hit.to_dict()))


@cli.command()
@click.argument("checkpoint_url")
@storage_option
@handle_errors
def info(checkpoint_url: str, storage_options: str | None) -> None:
    """Verify a checkpoint and print its model_id, config and metadata as JSON.

    \b
    Example:
      vaepipe info runs/m.safetensors
    """
    from vae_model.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint_url, _so(storage_options))
    click.echo(json.dumps({"model_id": ckpt.model_id, "config": ckpt.config.to_dict(), "meta": ckpt.meta}, indent=2))


@cli.command()
@click.argument("partition_url")
@click.option("--out", "out_url", default=None, help="HTML file URL to write (default: PARTITION_URL/_report.html).")
@click.option("--top", type=click.IntRange(0, 4096), default=64, show_default=True,
              help="Thumbnails of the highest anomaly scores.")
@click.option("--compare", "compare_url", default=None, metavar="PREVIOUS_PARTITION_URL",
              help="Draw the figures against this earlier partition (e.g. the previous night).")
@storage_option
@handle_errors
def report(partition_url: str, out_url: str | None, top: int, compare_url: str | None,
           storage_options: str | None) -> None:
    """Write one self-contained HTML report of a finished partition and print its URL.

    Headline counts, flagged rate vs expected, score and percentile histograms against the
    checkpoint's validation images, per-shard throughput, dead letters, the drift section, and
    thumbnails of the top anomalies read back from the shards. `vaepipe embed` writes it too
    (unless --no-report).

    \b
    Example:
      vaepipe report s3://bucket/latents/dt=2026-11-28 --compare s3://bucket/latents/dt=2026-11-27
    """
    from pipeline.report import write_report

    click.echo(write_report(partition_url, out_url, top=top, compare_url=compare_url,
                            storage_options=_so(storage_options)))


def main() -> None:
    cli(prog_name="vaepipe")


if __name__ == "__main__":
    main()
