"""pipeline.drift: the manifest's drift section, on known distributions and on real data.

Real data: the tiny Fashion-MNIST checkpoint, recalibrated (as README advises) on 1,000 held-out
Fashion-MNIST images, then a partition of 400 other held-out Fashion images (passes) and one of
the same 400 with 100 MNIST digits mixed in (fails; ``--fail-on-drift`` exits 3 with every output
written).
"""
from __future__ import annotations

import io
import json
import math
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from jobs.cli import cli
from pipeline.drift import (DRIFT_EXIT_CODE, P_FAIL, embedding_shift, exit_status, flagged_rate, p_verdict,
                            partition_drift, percentile_uniform, previous_partition, worst)
from pipeline.idx import read_idx
from pipeline.manifest import read_manifest
from pipeline.options import EmbedOptions
from pipeline.run import run_embed
from vae_model.calibration import embedding_stats, percentile_of, quantile_table, threshold_for
from vae_model.checkpoint_header import CALIBRATION_FIELDS, calibration_id, inspect_checkpoint, validate_meta
from vae_model.config import VAEConfig
from vae_model.errors import CheckpointError, ConfigError

FASHION = Path(__file__).resolve().parents[1] / "data" / "demo" / "fashion-mnist-2k-images-idx3-ubyte.gz"


# -- known distributions ---------------------------------------------------------------------

def _calibrated(rng, n=1000):
    return quantile_table(rng.normal(size=n))


def test_percentiles_of_calibrated_data_pass_and_of_shifted_data_fail():
    rng = np.random.default_rng(0)
    table = _calibrated(rng)
    same = percentile_uniform(percentile_of(rng.normal(size=2000), table), table)
    assert same["verdict"] == "pass" and same["psi"] < 0.05 and same["ks_p"] > 0.01
    assert same["bins"] == [0.0, 50.0, 80.0, 90.0, 95.0, 100.0]  # stored quantiles, >= 5% of the mass a bin
    shifted = percentile_uniform(percentile_of(rng.normal(0.5, 1, size=2000), table), table)
    assert shifted["verdict"] == "fail" and shifted["ks_p"] < P_FAIL and shifted["psi"] >= 0.1


def test_flagged_rate_counts_the_calibration_sample_so_undrifted_nights_rarely_fail():
    """The threshold is the 0.99 quantile of only n validation scores: with n = 200 its true
    exceedance rate varies from run to run, which the plain binomial test ignores."""
    rng = np.random.default_rng(1)
    plain = adjusted = 0
    for _ in range(200):
        table = quantile_table(rng.normal(size=200))
        flags = rng.normal(size=3000) > threshold_for(table, 0.99)
        r = flagged_rate(flags, 0.99, table)
        plain += r["binomial_p"] < P_FAIL
        adjusted += r["p_value"] < P_FAIL
    assert adjusted <= 2 < plain  # ~0.1% expected; the binomial test fails a sizeable share
    table = quantile_table(rng.normal(size=200))
    drifted = rng.normal(1.0, 1, size=3000) > threshold_for(table, 0.99)  # ~9% above the threshold
    assert flagged_rate(drifted, 0.99, table)["verdict"] == "fail"


def test_embedding_shift_against_stored_statistics():
    rng = np.random.default_rng(2)
    cov = np.diag([1.0, 0.5, 2.0, 1.0])
    ref = embedding_stats(rng.multivariate_normal(np.zeros(4), cov, 1000))

    def shift(x):
        return embedding_shift(x.mean(0), np.cov(x, rowvar=False), len(x), ref)

    same = shift(rng.multivariate_normal(np.zeros(4), cov, 600))
    assert same["verdict"] == "pass" and same["mahalanobis"] < 0.2
    moved = shift(rng.multivariate_normal([0.3, 0, 0, 0], cov, 600))
    assert moved["verdict"] == "fail" and moved["mahalanobis"] == pytest.approx(0.3, abs=0.1)
    assert embedding_shift(np.zeros(4), np.eye(4), 10, None)["verdict"] == "skipped"  # older checkpoints


def test_previous_partition_is_the_latest_earlier_complete_one(tmp_path):
    for day, done in (("2026-01-01", True), ("2026-01-02", True), ("2026-01-03", False), ("2026-01-05", True)):
        (tmp_path / f"dt={day}").mkdir()
        if done:
            (tmp_path / f"dt={day}" / "_SUCCESS").write_bytes(b"")
    assert previous_partition(str(tmp_path), "2026-01-04").endswith("dt=2026-01-02")
    assert previous_partition(str(tmp_path), "2026-01-01") is None
    assert previous_partition(str(tmp_path), None) is None


def test_exit_status_is_3_only_when_asked_and_a_verdict_failed():
    failed = {"drift": {"failed": ["embedding_shift"]}}
    assert exit_status({**failed, "options": {"fail_on_drift": True}}) == DRIFT_EXIT_CODE == 3
    assert exit_status({**failed, "options": {"fail_on_drift": False}}) == 0
    assert exit_status({"drift": {"failed": []}, "options": {"fail_on_drift": True}}) == 0
    assert exit_status({"options": {"fail_on_drift": True}}) == 0  # a manifest without drift (older run)


# -- what calibration stores -----------------------------------------------------------------

def _rewrite_meta(url: str, out: Path, edit) -> str:
    """Copy a checkpoint with its vaepipe.meta edited (and nothing else re-sealed)."""
    data = Path(url).read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = json.loads(header["__metadata__"]["vaepipe.meta"])
    edit(meta)
    header["__metadata__"]["vaepipe.meta"] = json.dumps(meta, sort_keys=True)
    raw = json.dumps(header).encode()
    out.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    return str(out)


def test_embedding_stats_are_stored_sealed_and_checked(tiny_checkpoint, tmp_path):
    info = inspect_checkpoint(tiny_checkpoint)
    stats = info.meta["embedding_stats"]
    dim = info.config.latent_dim
    assert stats["n"] >= 32 and len(stats["mean"]) == dim and np.asarray(stats["cov"]).shape == (dim, dim)

    def nudge(meta):
        meta["embedding_stats"]["mean"][0] += 0.5

    with pytest.raises(CheckpointError, match="calibration hash mismatch"):
        inspect_checkpoint(_rewrite_meta(tiny_checkpoint, tmp_path / "edited.safetensors", nudge))
    cfg = VAEConfig(image_size=28, channels=1, latent_dim=2, widths=(8, 16))
    good = {"n": 10, "mean": [0.0, 1.0], "cov": [[1.0, 0.0], [0.0, 1.0]]}
    validate_meta({"embedding_stats": good}, cfg)
    for bad in ({**good, "n": 1}, {**good, "mean": [0.0]}, {**good, "cov": [[1.0, 0.0], [0.0, math.inf]]},
                {**good, "cov": [[1.0, 0.0]]}, [1, 2]):
        with pytest.raises(ConfigError, match="embedding_stats"):
            validate_meta({"embedding_stats": bad}, cfg)


def test_checkpoints_without_embedding_stats_keep_their_id_and_get_no_embedding_verdict(tiny_checkpoint, tmp_path,
                                                                                       mnist_shards):
    meta = inspect_checkpoint(tiny_checkpoint).meta
    old = {k: v for k, v in meta.items() if k != "embedding_stats"}
    # the id of statistics written before embedding_stats existed is the one they were sealed with
    import hashlib

    before = hashlib.sha256(json.dumps({k: old.get(k) for k in CALIBRATION_FIELDS}, sort_keys=True).encode())
    assert calibration_id(old) == before.hexdigest()[:16] != calibration_id(meta)

    def drop(m):
        m.pop("embedding_stats")

    url = _rewrite_meta(tiny_checkpoint, tmp_path / "old.safetensors", drop)
    data = bytearray(Path(url).read_bytes())  # re-seal as an older vaepipe did: the 3-field id
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["__metadata__"]["vaepipe.calibration_id"] = before.hexdigest()[:16]
    raw = json.dumps(header).encode()
    Path(url).write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(data[8 + n:]))
    m = run_embed(str(mnist_shards), EmbedOptions(url, str(tmp_path / "out")))
    assert m["drift"]["embedding_shift"]["verdict"] == "skipped"
    assert "vaepipe calibrate" in m["drift"]["embedding_shift"]["reason"]
    assert m["drift"]["flagged_rate"]["verdict"] != "skipped"


# -- real data -------------------------------------------------------------------------------

def _tar_shards(folder: Path, lo: int, hi: int, size: int) -> Path:
    images = read_idx(str(FASHION))
    folder.mkdir(parents=True)
    for start in range(lo, hi, size):
        with tarfile.open(folder / f"heldout-{start:05d}.tar", "w") as tf:
            for i in range(start, min(start + size, hi)):
                buf = io.BytesIO()
                Image.fromarray(images[i]).save(buf, "PNG")
                member = tarfile.TarInfo(f"{i:06d}.png")
                member.size = buf.tell()
                tf.addfile(member, io.BytesIO(buf.getvalue()))
    return folder


@pytest.fixture(scope="module")
def calibrated(tiny_checkpoint, tmp_path_factory) -> str:
    """The tiny checkpoint (trained on images 0-599) recalibrated on held-out images 600-1599."""
    from jobs.calibrate import calibrate

    root = tmp_path_factory.mktemp("drift")
    url = str(root / "calibrated.safetensors")
    shutil.copy(tiny_checkpoint, url)
    calibrate(url, str(_tar_shards(root / "calibration", 600, 1600, 500)), 1000, iwae_k=4)
    return url


@pytest.fixture(scope="module")
def partitions(tmp_path_factory, mnist_shards) -> tuple[Path, Path]:
    """Held-out Fashion images 1600-1999 (in distribution), and the same with 100 MNIST digits."""
    root = tmp_path_factory.mktemp("nights")
    normal = _tar_shards(root / "normal", 1600, 2000, 200)
    mixed = root / "mixed"
    shutil.copytree(normal, mixed)
    for shard in Path(mnist_shards).glob("*.tar"):
        shutil.copy(shard, mixed / shard.name)
    return normal, mixed


def _embed(data: Path, ckpt: str, out: Path, day: str):
    return CliRunner().invoke(cli, ["embed", str(data), "--checkpoint", ckpt, "--out", str(out), "--score",
                                    "typicality", "--run-date", day, "--fail-on-drift"], catch_exceptions=False)


def test_in_distribution_passes_and_mnist_mixed_in_fails_with_exit_3(calibrated, partitions, tmp_path):
    normal, mixed = partitions
    out = tmp_path / "latents"
    first = _embed(normal, calibrated, out, "2026-01-01")
    assert first.exit_code == 0, first.output
    night1 = read_manifest(str(out / "dt=2026-01-01"))
    drift = night1["drift"]
    assert drift["failed"] == [] and drift["verdict"] in ("pass", "warn")
    for name in ("flagged_rate", "percentile_uniform", "embedding_shift"):
        assert drift[name]["verdict"] in ("pass", "warn"), (name, drift[name])
    assert drift["embedding_shift"]["calibration_images"] == 1000
    assert drift["score_vs_previous"]["verdict"] == "skipped"  # the first night

    second = _embed(mixed, calibrated, out, "2026-01-02")
    assert second.exit_code == DRIFT_EXIT_CODE == 3, second.output
    part = out / "dt=2026-01-02"
    assert (part / "_SUCCESS").exists() and not (part / "_lease.json").exists()
    night2 = read_manifest(str(part))
    assert night2["reconciled"] and night2["totals"]["rows"] == 500 and len(night2["files"]) == 4
    drift = night2["drift"]
    assert drift["verdict"] == "fail"
    # The percentiles and the embeddings give the night away whatever the score's power. The 2-epoch
    # toy model's typicality (the battery's combination, BENCHMARKS.md "Anomaly battery") puts few
    # of these 100 digits past its 0.99 threshold (1 here; models trained for minutes: most), so the
    # flag rate and the score-vs-previous test are checked for what they compute, not for a verdict.
    assert {"percentile_uniform", "embedding_shift"} <= set(drift["failed"])
    rate = drift["flagged_rate"]
    assert rate["rows"] == 500 and rate["rate"] == rate["flagged"] / 500 and rate["calibration_images"] == 1000
    assert rate["verdict"] == p_verdict(rate["p_value"])
    previous = drift["score_vs_previous"]
    assert previous["verdict"] == worst(previous["ks_verdict"], previous["psi_verdict"])
    assert previous["previous"].endswith("dt=2026-01-01") and previous["previous_rows"] == 400
    assert night2["metrics"]["available"] and night2["metrics"]["counters"]["rows"] == 500
    assert "drift: fail" in second.output


def test_drift_of_a_partition_read_back_is_the_manifests(calibrated, partitions, tmp_path):
    """partition_drift is a function of the partition's rows: recomputing it gives the same verdicts."""
    normal, _ = partitions
    m = run_embed(str(normal), EmbedOptions(calibrated, str(tmp_path / "o"), score="typicality"))
    info = inspect_checkpoint(calibrated)
    context = {**m, "drift_reference": {"quantiles": info.score_quantiles["typicality"],
                                        "embedding_stats": info.meta["embedding_stats"]}}
    again = partition_drift(m["partition_url"], m["files"], context)
    for name in ("flagged_rate", "percentile_uniform", "embedding_shift"):
        assert {k: v for k, v in again[name].items()} == m["drift"][name]
