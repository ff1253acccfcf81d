"""vaepipe inside your own Beam pipeline: a RunInference model handler and an element-wise transform.

    from pipeline.handler import ScoreImages, VAEModelHandler

    rows = images | RunInference(VAEModelHandler("s3://models/vae.safetensors", score="elbo"))
    rows, dead = keyed_bytes | ScoreImages("s3://models/vae.safetensors")

Elements are ``(key, encoded bytes)``, ``(key, uint8 (C, H, W) array)``, a bare bytes or array
(the row's ``key`` is then null), or an :class:`ImageRecord`, which also carries the shard,
index, label and metadata a row holds (:func:`shard_records` reads them from shards exactly as
``vaepipe embed`` does). Each becomes one row dict with the columns of ``pipeline.schema``,
built and scored by :class:`pipeline.embed.ShardEmbedder`, the code ``vaepipe embed`` runs, so
the same image gives the same row either way (up to the float rounding of a different batch:
README, "Anomaly scores").

Decoding is the handler's preprocessing step, one element at a time, so with
``RunInference(...).with_exception_handling()`` an undecodable image is one element of
``dlq.failed_preprocessing[0]`` and never fails its batch; a batch whose scoring raises goes
to ``dlq.failed_inferences``. :class:`ScoreImages` turns both into dead-letter dicts
(``pipeline.schema.ERROR_COLUMNS``). When to use this and when ``EmbedShards``: README,
"Inside your own Beam pipeline".
"""
from __future__ import annotations

import logging
import pickle
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import ModelHandler, RunInference

from pipeline.decode import decode_image
from pipeline.members import ReadLimits, escape_key
from pipeline.options import EmbedOptions, check_score_supported, resolve_resize
from vae_model.checkpoint_header import inspect_checkpoint
from vae_model.errors import ImageDecodeError

log = logging.getLogger(__name__)

NAMESPACE = "vaepipe"  # Beam metrics namespace (RunInference's num_inferences, inference_batch_latency, ...)


class ImageRecord(NamedTuple):
    """One image with the row fields a shard gives it (all optional but ``data``)."""

    key: str | None
    data: bytes | np.ndarray  # encoded image, or decoded uint8 (C, H, W)
    shard: str | None = None
    index: int | None = None
    label: int | None = None
    meta: Any = None  # parsed JSON sidecar


class _Decoded(NamedTuple):
    """A decoded element on its way to :meth:`ShardEmbedder.score_rows`."""

    item: Any  # pipeline.embed.BatchItem (torch-free here: built on the worker)
    shard: str | None


def as_record(element: Any) -> ImageRecord:
    """Any accepted element as an :class:`ImageRecord`."""
    if isinstance(element, ImageRecord):
        return element
    if isinstance(element, (bytes, bytearray, memoryview, np.ndarray)):
        return ImageRecord(None, element)
    if isinstance(element, tuple) and len(element) == 2:
        return ImageRecord(element[0], element[1])
    raise TypeError(f"VAEModelHandler takes (key, image bytes or uint8 array), image bytes, a uint8 array or an "
                    f"ImageRecord; got {type(element).__name__}")


def shard_records(spec: Any, storage_options: dict | None = None, limits: ReadLimits | None = None
                  ) -> Iterator[ImageRecord]:
    """The images of one shard (a :class:`pipeline.shards.ShardSpec`) as records with the key,
    shard, index, label and metadata ``vaepipe embed`` gives their rows; members the reader
    cannot read are skipped (logged); ``vaepipe embed`` writes them as dead letters."""
    from pipeline.shards import iter_members

    shard = escape_key(spec.name)
    for m in iter_members(spec, storage_options, limits=limits):
        if m.error is not None or m.data is None:
            log.warning("%s/%s: %s", shard, m.key, m.error or "member has no data")
            continue
        yield ImageRecord(f"{shard}/{m.key}", m.data, shard, m.index, m.label, m.meta)


class VAEModelHandler(ModelHandler[Any, dict, Any]):
    """Beam ``ModelHandler`` for a vaepipe checkpoint: image elements in, row dicts out.

    ``RunInference(VAEModelHandler(url, score="elbo"))``. The model is loaded once per worker
    process (Beam's ``Shared``), or once per machine with ``large_model=True`` (Beam's
    ``MultiProcessShared``: each batch then crosses a process boundary). ``options`` takes
    the remaining :class:`pipeline.options.EmbedOptions` fields (``iwae_k``, ``seed``,
    ``threshold_quantile``, ``run_date``, ``device``, ``precision``, ``torch_threads``,
    ``max_pixels``, ``storage_options``); they are checked here, on the driver, and so is the
    checkpoint (it must exist and support ``score``).
    """

    def __init__(self, checkpoint: str, score: str = "elbo", *, min_batch_size: int | None = None,
                 max_batch_size: int = 256, large_model: bool = False, model_copies: int | None = None,
                 **options: Any) -> None:
        # min_batch_size defaults to max_batch_size: full batches (BatchElements' adaptive sizing,
        # which starts at 1, halved the throughput: BENCHMARKS.md); a bundle's end still flushes.
        super().__init__(min_batch_size=max_batch_size if min_batch_size is None else min_batch_size,
                         max_batch_size=max_batch_size, large_model=large_model, model_copies=model_copies)
        self.opts = EmbedOptions(checkpoint=checkpoint, out_url="", score=score, batch_size=max_batch_size,
                                 **options)
        info = inspect_checkpoint(checkpoint, self.opts.storage_options)
        self.opts = resolve_resize(self.opts, info.meta)  # decoded as the model was trained, unless resize= says
        check_score_supported(self.opts, info)  # a ConfigError now, not on every worker
        self.model_id, self.channels, self.size = info.model_id, info.config.channels, info.config.image_size

    def load_model(self) -> Any:
        """A :class:`pipeline.embed.ShardEmbedder` (model on its device, score options resolved)."""
        from pipeline.embed import ShardEmbedder  # torch: imported by workers, not by the driver

        return ShardEmbedder(self.opts)

    def get_preprocess_fns(self) -> Iterable:
        return [self.decode]

    def decode(self, element: Any) -> _Decoded:
        """One element, decoded as ``vaepipe embed`` decodes (:func:`pipeline.decode.decode_image`)."""
        from pipeline.embed import BatchItem

        r = as_record(element)
        if isinstance(r.data, np.ndarray):
            pixels = r.data
            if pixels.dtype != np.uint8 or pixels.shape != (self.channels, self.size, self.size):
                raise ImageDecodeError(f"decoded image must be uint8 {(self.channels, self.size, self.size)}, "
                                       f"got {pixels.dtype} {pixels.shape}")
        elif isinstance(r.data, (bytes, bytearray, memoryview)):
            pixels = decode_image(bytes(r.data), self.channels, self.size, max_pixels=self.opts.max_pixels,
                                  resize=self.opts.resize)
        else:  # None, a str, ...: a dead letter that says what came instead of an image
            raise ImageDecodeError(f"image data must be encoded bytes or a uint8 array, got {type(r.data).__name__}")
        return _Decoded(BatchItem(r.key, r.index, r.label, r.meta, pixels), r.shard)

    def run_inference(self, batch: Sequence[_Decoded], model: Any, inference_args: dict | None = None
                      ) -> Iterable[dict]:
        rows = model.score_rows([d.item for d in batch], [d.shard for d in batch])
        return rows.to_pylist()

    def get_num_bytes(self, batch: Sequence[_Decoded]) -> int:
        return sum(d.item.pixels.nbytes for d in batch) + len(pickle.dumps([d.item.key for d in batch]))

    def get_metrics_namespace(self) -> str:
        return NAMESPACE

    def batch_elements_kwargs(self) -> dict:
        return dict(self._batching_kwargs)  # min/max_batch_size: one forward pass per batch

    def __repr__(self) -> str:
        return f"VAEModelHandler({self.opts.checkpoint!r}, score={self.opts.score!r}, model_id={self.model_id[:12]})"


class ScoredImages(NamedTuple):
    """What :class:`ScoreImages` returns: rows and dead letters (both PCollections of dicts)."""

    rows: beam.PCollection
    dead_letters: beam.PCollection


class ScoreImages(beam.PTransform):
    """PCollection of image elements (``(key, bytes)``, ... as :class:`VAEModelHandler`) ->
    :class:`ScoredImages` (rows, dead letters): the rows ``vaepipe embed`` writes, one per image.

    ``ScoreImages(checkpoint, score="elbo", **options)`` or ``ScoreImages(handler=...)``.
    """

    def __init__(self, checkpoint: str | None = None, score: str = "elbo", *, handler: VAEModelHandler | None = None,
                 **options: Any) -> None:
        super().__init__()
        if (checkpoint is None) == (handler is None):
            raise ValueError("give exactly one of checkpoint and handler")
        self.handler = handler or VAEModelHandler(checkpoint, score, **options)

    def expand(self, images):
        h = self.handler
        rows, dlq = images | "RunInference" >> RunInference(h, metrics_namespace=NAMESPACE).with_exception_handling()
        run_date = h.opts.run_date
        decode_failed = dlq.failed_preprocessing[0] | "DecodeDeadLetters" >> beam.Map(
            _decode_dead_letter, h.model_id, run_date)
        score_failed = dlq.failed_inferences | "ScoreDeadLetters" >> beam.FlatMap(
            _score_dead_letters, h.model_id, run_date)
        dead = (decode_failed, score_failed) | "DeadLetters" >> beam.Flatten()
        return ScoredImages(rows, dead)


def _failure(failure: Any) -> tuple[str, str]:
    """(error_type, one-line message) of Beam's dead-letter value ``(element, (type, repr, traceback lines))``."""
    etype, text, tb = failure[1]
    last = tb[-1].strip() if tb else ""  # "module.Type: message"
    message = last.split(": ", 1)[1] if ": " in last else text
    return getattr(etype, "error_type", None) or etype.__name__, " ".join(message.split())


def _decode_dead_letter(failure: Any, model_id: str, run_date: str | None) -> dict:
    from pipeline.embed import dead_letter  # torch: workers only

    r = _safe_record(failure[0])
    return dead_letter(r.key, r.shard, r.index, "decode", *_failure(failure), model_id, _date(run_date))


def _score_dead_letters(failure: Any, model_id: str, run_date: str | None) -> Iterator[dict]:
    from pipeline.embed import dead_letter

    etype, message = _failure(failure)
    for d in failure[0]:
        yield dead_letter(d.item.key, d.shard, d.item.index, "score", etype, message, model_id, _date(run_date))


def _safe_record(element: Any) -> ImageRecord:
    try:
        return as_record(element)
    except TypeError:
        return ImageRecord(None, b"")


def _date(run_date: str | None):
    import datetime as dt

    return dt.date.fromisoformat(run_date) if run_date else None
