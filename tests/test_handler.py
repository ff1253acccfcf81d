"""pipeline.handler: VAEModelHandler under RunInference and ScoreImages give vaepipe embed's rows."""
import math
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.ml.inference.base import RunInference
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipeline.decode import decode_image
from pipeline.handler import ImageRecord, ScoreImages, VAEModelHandler, shard_records
from pipeline.options import EmbedOptions
from pipeline.run import run_embed
from pipeline.schema import ERROR_SCHEMA, latent_schema
from pipeline.shards import expand_shards
from vae_model.errors import ConfigError, ImageDecodeError

RUN_DATE = "2026-01-02"


def _embed_rows(shards: Path, ckpt: str, out: Path) -> dict[str, dict]:
    run_embed(str(shards), EmbedOptions(ckpt, str(out), batch_size=64, run_date=RUN_DATE))
    rows = pq.read_table(str(out / f"dt={RUN_DATE}")).to_pylist()
    return {r["key"]: r for r in rows}


def _records(shards: Path) -> list[ImageRecord]:
    return [r for spec in expand_shards(str(shards)) for r in shard_records(spec)]


def _same_rows(expected: dict[str, dict]):
    """Matcher: the rows are exactly ``expected`` (floats to the 1e-5 to which rows reproduce
    across batch sizes: a RunInference batch is not a shard's batch)."""
    def check(actual):
        assert sorted(r["key"] for r in actual) == sorted(expected)
        for row in actual:
            want = expected[row["key"]]
            assert list(row) == list(want)  # same columns, same order
            for col, v in row.items():
                w = want[col]
                if isinstance(w, float):
                    assert math.isclose(v, w, rel_tol=1e-5, abs_tol=1e-3), (row["key"], col, v, w)
                elif col == "embedding":
                    np.testing.assert_allclose(v, w, atol=1e-5)
                else:
                    assert v == w, (row["key"], col, v, w)
    return check


def test_score_images_gives_vaepipe_embed_rows_and_dead_letters(fashion_shards, tiny_checkpoint, tmp_path):
    expected = _embed_rows(fashion_shards, tiny_checkpoint, tmp_path / "embed")
    assert len(expected) == 600
    bad = [ImageRecord("bad/0", b"not an image", "bad", 0), ("bad/1", np.zeros((3, 5, 5), np.uint8))]
    with TestPipeline() as p:
        rows, dead = p | beam.Create(_records(fashion_shards) + bad) | ScoreImages(tiny_checkpoint,
                                                                                   run_date=RUN_DATE)
        assert_that(rows, _same_rows(expected), label="Rows")
        model_id = next(iter(expected.values()))["model_id"]
        assert_that(dead | beam.Map(lambda d: (list(d) == ERROR_SCHEMA.names, d["key"], d["shard"], d["index"],
                                               d["stage"], d["error_type"], d["model_id"], str(d["run_date"]),
                                               d["message"][:16])),
                    equal_to([(True, "bad/0", "bad", 0, "decode", "ImageDecodeError", model_id, RUN_DATE,
                               "cannot decode im"),
                              (True, "bad/1", None, None, "decode", "ImageDecodeError", model_id, RUN_DATE,
                               "decoded image mu")]),
                    label="DeadLetters")


def test_run_inference_over_keyed_bytes_and_decoded_images(fashion_shards, tiny_checkpoint, tmp_path):
    """RunInference(VAEModelHandler) over (key, bytes), (key, array) and bare arrays; bad bytes
    go to the preprocessing dead letters one by one, the rest of their batch is scored."""
    records = _records(fashion_shards)[:40]
    expected = {k: r for k, r in _embed_rows(fashion_shards, tiny_checkpoint, tmp_path / "embed").items()
                if k in {r.key for r in records}}
    keyed_bytes = [(r.key, r.data) for r in records[:20]]
    keyed_arrays = [(r.key, decode_image(r.data, 1, 28)) for r in records[20:]]
    handler = VAEModelHandler(tiny_checkpoint, max_batch_size=16)
    p = TestPipeline()
    rows, dlq = (p | beam.Create(keyed_bytes + keyed_arrays + [("broken", b"\x89PNG\r\n\x1a\n")])
                 | RunInference(handler).with_exception_handling())
    image_only = ("embedding", "elbo", "recon_nll", "kl", "bits_per_dim", "anomaly_score", "anomaly_percentile",
                  "is_anomaly", "model_id")
    assert_that(rows | beam.Map(lambda r: {"key": r["key"], **{c: r[c] for c in image_only}}),
                _same_rows({k: {"key": k, **{c: r[c] for c in image_only}} for k, r in expected.items()}))
    assert_that(dlq.failed_preprocessing[0] | beam.Map(lambda f: (f[0][0], f[1][0].__name__)),
                equal_to([("broken", "ImageDecodeError")]), label="Broken")
    assert_that(dlq.failed_inferences, equal_to([]), label="NoFailedBatches")
    unkeyed = (p | "Unkeyed" >> beam.Create([keyed_arrays[0][1]])
               | "RunUnkeyed" >> RunInference(handler)
               | beam.Map(lambda r: (r["key"], r["shard"], r["index"], r["label"])))
    assert_that(unkeyed, equal_to([(None, None, None, None)]), label="UnkeyedRow")
    result = p.run()
    result.wait_until_finish()
    counters = result.metrics().query(MetricsFilter().with_namespace("vaepipe").with_name("num_inferences"))
    assert sorted(m.committed for m in counters["counters"]) == [1, 40]  # one per RunInference step


def test_handler_api_and_driver_checks(tiny_checkpoint, tmp_path):
    h = VAEModelHandler(tiny_checkpoint, score="iwae", iwae_k=4, min_batch_size=8, max_batch_size=32)
    assert h.batch_elements_kwargs() == {"min_batch_size": 8, "max_batch_size": 32}
    assert h.get_metrics_namespace() == "vaepipe" and not h.share_model_across_processes()
    assert VAEModelHandler(tiny_checkpoint, large_model=True).share_model_across_processes()
    decoded = [h.decode(("k", np.full((1, 28, 28), 7, np.uint8))) for _ in range(3)]
    assert h.get_num_bytes(decoded) >= 3 * 784
    model = h.load_model()
    rows = list(h.run_inference(decoded, model))
    assert [list(r) for r in rows] == [latent_schema(4).names] * 3 and rows[0]["iwae_nll"] is not None
    with pytest.raises(ConfigError, match="--score"):
        VAEModelHandler(tiny_checkpoint, score="likelihood")
    with pytest.raises(ConfigError, match="--iwae-k"):
        VAEModelHandler(tiny_checkpoint, score="iwae", iwae_k=0)
    with pytest.raises(Exception, match="missing.safetensors"):
        VAEModelHandler(str(tmp_path / "missing.safetensors"))
    with pytest.raises(TypeError, match="ImageRecord"):
        h.decode(42)
    for data in (None, "a path, not bytes"):  # a dead letter that names what came instead of an image
        with pytest.raises(ImageDecodeError, match=f"must be encoded bytes or a uint8 array, got {type(data).__name__}"):
            h.decode(("k", data))


def test_model_shared_across_processes_gives_the_same_rows(tiny_checkpoint):
    """large_model=True: one model per machine behind Beam's MultiProcessShared proxy."""
    images = [(f"k{i}", np.full((1, 28, 28), 9 * i, np.uint8)) for i in range(12)]
    h = VAEModelHandler(tiny_checkpoint)
    expected = {r["key"]: r for r in h.run_inference([h.decode(e) for e in images], h.load_model())}
    with TestPipeline() as p:
        rows = p | beam.Create(images) | RunInference(VAEModelHandler(tiny_checkpoint, large_model=True,
                                                                      max_batch_size=5))
        assert_that(rows, _same_rows(expected))
