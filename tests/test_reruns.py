"""Reruns that are exact and failures that name their cause (issue 10, sections 4 and 5).

Real runs on the DirectRunner with the tiny trained checkpoint; the only stand-in is a
ShardEmbedder subclass that fails its own scoring call on large batches (a MemoryError cannot be
provoked safely on a shared machine)."""
import dataclasses
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from jobs.cli import cli
from pipeline.embed import ShardEmbedder
from pipeline.options import ROW_NEUTRAL_OPTIONS, EmbedOptions, output_key
from pipeline.partition import PartitionConflictError
from pipeline.run import run_embed
from pipeline.shards import expand_shards
from vae_model.checkpoint import load_checkpoint, save_checkpoint
from vae_model.model import VAE
from vae_model.noise import iwae_noise_for_keys

REPO = Path(__file__).resolve().parents[1]

# A value other than the default for every option that changes a row. A new EmbedOptions field
# must be added here or to ROW_NEUTRAL_OPTIONS: this test fails until it is.
OTHER_VALUE = {"score": "iwae", "iwae_k": 8, "threshold_quantile": 0.5, "run_date": "2026-01-02",
               "precision": "bf16", "seed": 3, "max_pixels": 1000, "max_member_bytes": 1000,
               "max_sidecar_bytes": 10, "resize": "pad"}
NEUTRAL_VALUE = {"checkpoint": "other.safetensors", "out_url": "/elsewhere", "batch_size": 7, "device": "cpu",
                 "skip_existing": False, "torch_threads": 3, "storage_options": {"anon": True},
                 "mode": "overwrite", "lease_owner": "x", "driver": {"pid": 1}, "fail_on_drift": True,
                 "report": False}


def _rows(folder: Path) -> pd.DataFrame:
    files = sorted(folder.glob("*.parquet"))
    return pd.concat([pd.read_parquet(p) for p in files]).sort_values("key").reset_index(drop=True)


def test_every_option_that_changes_a_row_is_in_the_output_key():
    base = EmbedOptions("ck.safetensors", "/out")
    names = {f.name for f in dataclasses.fields(EmbedOptions)}
    assert set(OTHER_VALUE) | set(NEUTRAL_VALUE) == names, "classify the new EmbedOptions field here"
    assert set(NEUTRAL_VALUE) == ROW_NEUTRAL_OPTIONS
    key = output_key(base, "m", "c", "fp32")[0]
    for name, value in OTHER_VALUE.items():
        changed = dataclasses.replace(base, **{name: value}) if name != "precision" else base
        precision = value if name == "precision" else "fp32"
        assert output_key(changed, "m", "c", precision)[0] != key, name
    for name, value in NEUTRAL_VALUE.items():
        assert output_key(dataclasses.replace(base, **{name: value}), "m", "c", "fp32")[0] == key, name
    assert output_key(base, "m2", "c", "fp32")[0] != key and output_key(base, "m", "c2", "fp32")[0] != key


def test_changed_threshold_or_precision_is_recomputed_not_skipped(fashion_shards, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    run_embed(str(fashion_shards), EmbedOptions(tiny_checkpoint, str(out)))
    before = _rows(out)
    m = run_embed(str(fashion_shards), EmbedOptions(tiny_checkpoint, str(out), threshold_quantile=0.5))
    assert m["totals"]["shards_skipped"] == 0
    after = _rows(out)
    assert after["is_anomaly"].sum() > before["is_anomaly"].sum()  # half the validation scores lie above
    m = run_embed(str(fashion_shards), EmbedOptions(tiny_checkpoint, str(out), threshold_quantile=0.5,
                                                    precision="bf16"))
    assert m["totals"]["shards_skipped"] == 0
    m = run_embed(str(fashion_shards), EmbedOptions(tiny_checkpoint, str(out), threshold_quantile=0.5,
                                                    precision="bf16"))
    assert m["totals"]["shards_skipped"] == 3  # same settings again: skipped


def test_rows_of_an_older_score_version_are_recomputed_not_skipped(fashion_shards, tiny_checkpoint, tmp_path,
                                                                  monkeypatch):
    """Rows written by the scoring before the on-device noise (score version 1) hold other
    scores: skip-existing must redo them, then skip its own."""
    from pipeline import options

    assert options.SCORE_VERSION != "1"
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(options, "SCORE_VERSION", "1")  # what the scoring before this version wrote
        run_embed(str(fashion_shards), EmbedOptions(tiny_checkpoint, str(out)))
    assert len(list(out.glob("*.parquet"))) == 3
    m = run_embed(str(fashion_shards), EmbedOptions(tiny_checkpoint, str(out)))
    assert m["totals"]["shards_skipped"] == 0 and m["totals"]["rows"] == 600
    m = run_embed(str(fashion_shards), EmbedOptions(tiny_checkpoint, str(out)))
    assert m["totals"]["shards_skipped"] == 3


def test_a_partition_never_mixes_runs(fashion_shards, mnist_shards, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    run_embed(str(fashion_shards), EmbedOptions(tiny_checkpoint, str(out)))
    # other shards into the same partition: refused by default, nothing written
    with pytest.raises(PartitionConflictError, match="--mode append"):
        run_embed(str(mnist_shards), EmbedOptions(tiny_checkpoint, str(out)))
    assert len(list(out.glob("*.parquet"))) == 3 and (out / "_SUCCESS").exists()
    # append with the same model and settings: the manifest describes the whole partition
    m = run_embed(str(mnist_shards), EmbedOptions(tiny_checkpoint, str(out), mode="append"))
    assert m["totals"]["rows"] == 700 and m["totals"]["shards"] == 5 and len(m["kept"]) == 3
    assert m["reconciled"] and m["files"] == sorted(p.name for p in out.glob("*.parquet"))
    assert len(_rows(out)) == 700
    # another model: append is refused with one line naming the other model
    other = tmp_path / "other.safetensors"
    torch.manual_seed(1)
    ckpt = load_checkpoint(tiny_checkpoint)
    save_checkpoint(VAE(ckpt.config), str(other), {})
    with pytest.raises(PartitionConflictError, match=f"same model {ckpt.model_id}|model {ckpt.model_id}"):
        run_embed(str(mnist_shards), EmbedOptions(str(other), str(out), mode="append"))
    # overwrite: the other shards' rows go, the partition holds one model's rows only
    m = run_embed(str(mnist_shards), EmbedOptions(str(other), str(out), mode="overwrite"))
    rows = _rows(out)
    assert len(rows) == 100 and rows["model_id"].nunique() == 1 and m["reconciled"]
    assert m["files"] == sorted(p.name for p in out.glob("*.parquet")) and len(m["deleted"]) == 3
    assert (out / "_SUCCESS").exists()


class _SmallBatchesOnly(ShardEmbedder):
    """Scoring runs out of memory above 8 images, and always on one poisoned image."""

    poison: bytes | None = None

    def _score(self, pixels):
        if len(pixels) > 8:
            raise MemoryError(f"cannot allocate a batch of {len(pixels)}")
        if self.poison is not None and any(p.tobytes() == self.poison for p in pixels):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return super()._score(pixels)


def test_out_of_memory_retries_in_halves_then_dead_letters(fashion_shards, tiny_checkpoint, tmp_path):
    spec = expand_shards(str(fashion_shards))[0]
    ref = ShardEmbedder(EmbedOptions(tiny_checkpoint, str(tmp_path / "ref"), batch_size=64))
    ref.process(spec)
    flaky = _SmallBatchesOnly(EmbedOptions(tiny_checkpoint, str(tmp_path / "out"), batch_size=64))
    summary = flaky.process(spec)
    assert summary["rows"] == 200 and summary["errors"] == 0
    a, b = _rows(tmp_path / "ref"), _rows(tmp_path / "out")
    np.testing.assert_allclose(np.stack(a["embedding"]), np.stack(b["embedding"]), atol=1e-5)
    np.testing.assert_allclose(a["elbo"], b["elbo"], rtol=1e-6)
    # one image that fails even alone is one dead letter; the rest of its batch is scored
    from pipeline.decode import decode_image
    from pipeline.shards import iter_members

    first = next(iter_members(spec))
    flaky.poison = decode_image(first.data, 1, 28).tobytes()
    flaky.opts = dataclasses.replace(flaky.opts, skip_existing=False)
    summary = flaky.process(spec)
    assert summary["rows"] == 199 and summary["errors"] == 1
    errors = pd.read_parquet(flaky.errors_url(spec))
    assert list(errors["stage"]) == ["score"] and errors["message"][0].startswith("DefaultCPUAllocator")


def test_iwae_noise_does_not_depend_on_chunking(tiny_checkpoint):
    model = load_checkpoint(tiny_checkpoint).model
    x = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    keys = ["a", "b", "c"]

    def eps(start, n):
        return iwae_noise_for_keys(keys, model.cfg.latent_dim, 1, start, n)

    with torch.no_grad():
        whole = model.iwae(x, 150, eps=eps, chunk_size=150, precise=True)
        chunked = model.iwae(x, 150, eps=eps, chunk_size=7, precise=True)
    torch.testing.assert_close(whole, chunked, rtol=1e-9, atol=1e-9)


def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("flags, message", [
    (["--torch-threads", "-5"], "--torch-threads -5: must be an integer from 0"),
    (["--score", "iwae", "--iwae-k", str(10 ** 9)], "--iwae-k 1000000000: must be an integer from 1 to 10,000"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--max-pixels", "0"], "--max-pixels 0"),
    (["--run_date", "2026-01-01"], "unknown option --run_date (did you mean --run-date?)"),
    (["--direct_num_worker=2"], "did you mean --direct_num_workers?"),
])
def test_bad_options_fail_on_the_driver_with_one_line(flags, message, fashion_shards, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    res = _cli("embed", fashion_shards, "--checkpoint", tiny_checkpoint, "--out", out, *flags)
    assert res.exit_code == 1, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], res.output
    assert not out.exists()


def test_a_worker_failure_prints_its_cause_in_the_default_multi_worker_run(tiny_checkpoint, tmp_path):
    """The output's dead-letter folder is blocked by a file: only a worker finds out (when it
    writes a shard's dead letters). The one line must be the worker's cause, not Beam's wrapper."""
    from model_fixtures import FASHION

    from pipeline.shards import write_shards

    shards = tmp_path / "shards"
    write_shards(str(FASHION), str(shards), shard_size=20, limit=40)
    with tarfile.open(shards / "shard-000000.tar", "a") as tf:  # a dead letter: a corrupt image
        info = tarfile.TarInfo("zz-corrupt.png")
        info.size = len(b"\x89PNG junk")
        tf.addfile(info, io.BytesIO(b"\x89PNG junk"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "errors").write_text("not a folder")
    res = subprocess.run([sys.executable, "-m", "jobs", "embed", str(shards), "--checkpoint", tiny_checkpoint,
                          "--out", str(out), "--direct_num_workers=2", "--direct_running_mode=multi_processing"],
                         capture_output=True, text=True, cwd=REPO, timeout=240)
    assert res.returncode == 1
    lines = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, res.stderr[-3000:]
    assert "internal error" not in lines[0] and "Traceback" not in lines[0]
    assert "errors" in lines[0] and ("Errno" in lines[0] or "exists" in lines[0].lower()), lines[0]
    assert not (out / "_SUCCESS").exists()
