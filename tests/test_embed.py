"""The embedding pipeline on the DirectRunner: output contract, nothing lost, reruns."""
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.options import EmbedOptions
from pipeline.run import run, run_embed
from vae_model.checkpoint import load_checkpoint, save_checkpoint
from vae_model.errors import CheckpointError, NoShardsError, StorageError


def _rows(out: Path) -> pd.DataFrame:
    files = sorted(p for p in out.glob("*.parquet"))
    return pd.concat([pd.read_parquet(p) for p in files]).sort_values("key").reset_index(drop=True)


def test_rows_schema_metadata_and_manifest(fashion_shards, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    manifest = run_embed(str(fashion_shards), EmbedOptions(tiny_checkpoint, str(out), batch_size=64))
    ckpt = load_checkpoint(tiny_checkpoint)
    assert manifest["reconciled"] and manifest["totals"] == {
        "images_seen": 600, "rows": 600, "errors": 0, "shards": 3, "shards_skipped": 0}
    assert manifest["model_id"] == ckpt.model_id and len(manifest["inputs"]) == 3
    assert (out / "_SUCCESS").exists() and (out / "_manifest.json").exists()
    files = sorted(out.glob("*.parquet"))
    assert len(files) == 3
    pf = pq.ParquetFile(files[0])
    schema = pf.schema_arrow
    assert schema.field("embedding").type == pa.list_(pa.float32(), 4)
    assert pf.metadata.row_group(0).column(0).compression == "ZSTD"
    md = {k.decode(): v.decode() for k, v in pf.metadata.metadata.items()}
    assert md["vaepipe.model_id"] == ckpt.model_id
    assert json.loads(md["vaepipe.config"])["latent_dim"] == 4
    df = _rows(out)
    assert df["key"].is_unique and len(df) == 600
    assert df["key"].iloc[0].startswith(str(fashion_shards))
    assert set(df["label"].unique()) <= set(range(10)) and df["label"].notna().all()
    assert np.allclose(df["elbo"], -(df["recon_nll"] + df["kl"]))
    assert np.allclose(df["bits_per_dim"], -df["elbo"] / (784 * np.log(2)))
    assert np.allclose(df["anomaly_score"], -df["elbo"])
    assert df["anomaly_percentile"].between(0, 100).all()
    assert df["is_anomaly"].dtype == bool and (df["model_id"] == ckpt.model_id).all()
    # The embedding is the posterior mean, as the model computes it.
    import torch
    from pipeline.decode import decode_image
    from pipeline.shards import expand_shards, iter_members
    spec = expand_shards(str(fashion_shards))[0]
    m = next(iter(iter_members(spec)))
    x = torch.from_numpy(decode_image(m.data, 1, 28)[None].copy())
    with torch.no_grad():
        mu = ckpt.model.encode(ckpt.model.prepare(x)[0]).mean[0].numpy()
    row = df[df["key"] == f"{spec.name}/{m.key}"].iloc[0]
    np.testing.assert_allclose(np.asarray(row["embedding"]), mu, atol=1e-5)


def test_readers_duckdb_pandas_pyarrow(fashion_shards, tiny_checkpoint, tmp_path):
    out = tmp_path / "latents"
    run_embed(str(fashion_shards), EmbedOptions(tiny_checkpoint, str(out), run_date="2026-11-28"))
    part = out / "dt=2026-11-28"
    assert (part / "_SUCCESS").exists()
    # The README's DuckDB query for the top anomalies.
    top = duckdb.sql(f"""
        SELECT key, anomaly_score, anomaly_percentile
        FROM read_parquet('{out}/dt=*/*.parquet', hive_partitioning = true)
        WHERE dt = '2026-11-28'
        ORDER BY anomaly_score DESC LIMIT 5""").fetchall()
    assert len(top) == 5 and top[0][1] >= top[-1][1]
    dataset = pads.dataset(str(out), format="parquet", partitioning="hive", ignore_prefixes=[".", "_", "errors"])
    table = dataset.to_table()
    assert table.num_rows == 600 and "dt" in table.column_names
    assert len(pd.read_parquet(part)) == 600


def _png(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _bad_inputs(root: Path) -> dict:
    """Shards with every kind of awkward input; returns the expected (rows, errors) count."""
    root.mkdir()
    rng = np.random.default_rng(0)
    gray = Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8))
    good = _png(gray)
    members = {
        "good.png": good, "good.cls": b"3",
        "rgba.png": _png(Image.new("RGBA", (28, 28), (10, 20, 30, 128))),
        "cmyk.jpg": _png(Image.new("CMYK", (28, 28), (0, 50, 100, 0)), "JPEG"),
        "deep.png": _png(Image.fromarray(rng.integers(0, 65535, (28, 28), dtype=np.uint16))),
        "palette.png": _png(gray.convert("P")),
        "odd_size.png": _png(Image.new("L", (64, 40), 200)),
        "corrupt.png": b"\x89PNG\r\n\x1a\n" + rng.bytes(300),
        "trunc.png": good[: len(good) // 2],
        "notes.txt": b"not an image",
    }
    _tar(root / "mixed.tar", members)
    _tar(root / "empty.tar", {})
    whole = root / "whole.tar"
    _tar(whole, {f"{i:03d}.png": good for i in range(6)})
    data = whole.read_bytes()
    (root / "cut.tar").write_bytes(data[: 512 * 7 + 100])  # cut inside a later member
    whole.unlink()
    (root / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    return {"good_rows": 6}


def test_nothing_lost_on_bad_inputs(tiny_checkpoint, tmp_path):
    _bad_inputs(tmp_path / "in")
    out = tmp_path / "out"
    manifest = run_embed(str(tmp_path / "in"), EmbedOptions(tiny_checkpoint, str(out), batch_size=4))
    t = manifest["totals"]
    assert manifest["reconciled"] and t["images_seen"] == t["rows"] + t["errors"]
    rows = pd.concat([pd.read_parquet(p) for p in out.glob("*.parquet")])
    errors = pd.concat([pd.read_parquet(p) for p in (out / "errors").glob("*.parquet")])
    assert len(rows) == t["rows"] and len(errors) == t["errors"]
    members = set(rows["key"].str.rsplit("/", n=1).str[-1])
    # Awkward but valid images become rows under the documented decode policy.
    assert {"good", "rgba", "cmyk", "deep", "palette", "odd_size"} <= members
    assert rows.loc[rows["key"].str.endswith("/good"), "label"].item() == 3
    by_key = {k.rsplit("/", 1)[-1]: (s, e) for k, s, e in zip(errors["key"], errors["stage"], errors["error_type"])}
    assert by_key["corrupt"] == ("decode", "ImageDecodeError")
    assert by_key["trunc"] == ("decode", "ImageDecodeError")
    assert by_key["notes"][0] == "read"
    assert any(e == "TruncatedShard" for _, e in by_key.values())
    assert any(e == "UnreadableShard" for _, e in by_key.values())
    assert errors["message"].str.len().gt(0).all() and errors["shard"].notna().all()
    # The truncated tar still delivered the members before the cut.
    cut = rows[rows["shard"].str.endswith("cut.tar")]
    assert len(cut) >= 1
    # The empty shard still has an (empty) output file, so reruns can skip it.
    per_shard = {s["shard"].rsplit("/", 1)[-1]: s for s in manifest["shards"]}
    assert per_shard["empty.tar"]["images_seen"] == 0


def test_deterministic_across_batch_sizes(fashion_shards, tiny_checkpoint, tmp_path):
    run_embed(str(fashion_shards), EmbedOptions(tiny_checkpoint, str(tmp_path / "a"), batch_size=256))
    run_embed(str(fashion_shards), EmbedOptions(tiny_checkpoint, str(tmp_path / "b"), batch_size=7))
    a, b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert list(a["key"]) == list(b["key"])
    np.testing.assert_allclose(np.stack(a["embedding"]), np.stack(b["embedding"]), atol=1e-5)
    np.testing.assert_allclose(a["elbo"], b["elbo"], rtol=1e-5, atol=1e-3)


def test_rerun_skips_existing_and_replaces_instead_of_duplicating(fashion_shards, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    opts = EmbedOptions(tiny_checkpoint, str(out))
    run_embed(str(fashion_shards), opts)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    again = run_embed(str(fashion_shards), EmbedOptions(tiny_checkpoint, str(out)))
    assert again["totals"]["shards_skipped"] == 3 and again["totals"]["rows"] == 600
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")} == before
    forced = run_embed(str(fashion_shards), EmbedOptions(tiny_checkpoint, str(out), skip_existing=False))
    assert forced["totals"]["shards_skipped"] == 0
    assert sorted(p.name for p in out.glob("*.parquet")) == sorted(before)
    assert len(_rows(out)) == 600


def test_other_score_reruns_shards(fashion_shards, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    run_embed(str(fashion_shards), EmbedOptions(tiny_checkpoint, str(out)))
    m = run_embed(str(fashion_shards), EmbedOptions(tiny_checkpoint, str(out), score="iwae", iwae_k=4))
    assert m["totals"]["shards_skipped"] == 0
    df = _rows(out)
    assert df["iwae_nll"].notna().all() and np.allclose(df["anomaly_score"], df["iwae_nll"])
    # IWAE-4 is a tighter bound than the single-sample ELBO on average.
    assert df["iwae_nll"].mean() < (-df["elbo"]).mean()


def test_killed_run_then_rerun_equals_uninterrupted(tiny_checkpoint, tmp_path):
    from pipeline.shards import write_shards
    from model_fixtures import FASHION

    shards = tmp_path / "shards"
    write_shards(str(FASHION), str(shards), shard_size=25, limit=300)  # 12 shards
    ref = tmp_path / "ref"
    run_embed(str(shards), EmbedOptions(tiny_checkpoint, str(ref), batch_size=16))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipeline.run", str(shards), "--checkpoint", tiny_checkpoint, "--out", str(out),
           "--batch-size", "16"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(out.glob("*.parquet"))) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(out.glob("*.parquet")))
    assert 0 < done < 12, "the kill should land midway"
    assert not (out / "_SUCCESS").exists()
    manifest = run_embed(str(shards), EmbedOptions(tiny_checkpoint, str(out), batch_size=16))
    assert manifest["totals"]["shards_skipped"] >= done and manifest["reconciled"]
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]  # no partial files left visible
    a, b = _rows(ref), _rows(out)
    assert len(b) == 300 and b["key"].is_unique
    pd.testing.assert_frame_equal(a.drop(columns=["embedding"]), b.drop(columns=["embedding"]))


def test_preflight_errors_write_nothing(fashion_shards, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(NoShardsError):
        run_embed(str(tmp_path / "nothing-here" / "*.tar"), EmbedOptions(tiny_checkpoint, str(out)))
    data = Path(tiny_checkpoint).read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="hash mismatch"):
        run_embed(str(fashion_shards), EmbedOptions(str(bad), str(out)))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="not writable"):
        run_embed(str(fashion_shards), EmbedOptions(tiny_checkpoint, str(blocker / "out")))
    assert not out.exists()


def test_run_passes_unknown_flags_to_beam(fashion_shards, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    manifest = run([str(fashion_shards), "--checkpoint", tiny_checkpoint, "--out", str(out),
                    "--runner=DirectRunner", "--direct_num_workers=1", "--no-skip-existing"])
    assert manifest["runner"] == "DirectRunner" and manifest["totals"]["rows"] == 600


def test_score_none_writes_embeddings_and_null_scores(fashion_shards, tiny_checkpoint, tmp_path):
    """--score none: the encoder only; the same embeddings as a scored run, every score column null,
    and skip-existing keys on the score (an elbo run over it redoes every shard)."""
    from pipeline.schema import ROW_COLUMNS

    scored, embedded = tmp_path / "elbo", tmp_path / "none"
    run_embed(str(fashion_shards), EmbedOptions(tiny_checkpoint, str(scored)))
    m = run_embed(str(fashion_shards), EmbedOptions(tiny_checkpoint, str(embedded), score="none"))
    assert m["reconciled"]
    a, b = _rows(scored), _rows(embedded)
    assert list(b.columns) == [c.name for c in ROW_COLUMNS] and len(a) == len(b)
    assert np.allclose(np.stack(a["embedding"]), np.stack(b["embedding"]), atol=1e-5)
    nulls = ["elbo", "recon_nll", "kl", "bits_per_dim", "iwae_nll", "complexity", "typicality", "anomaly_score",
             "anomaly_percentile", "is_anomaly"]
    assert b[nulls].isna().all().all() and b["key"].notna().all() and b["label"].notna().all()
    again = run_embed(str(fashion_shards), EmbedOptions(tiny_checkpoint, str(embedded), score="none"))
    assert again["totals"]["shards_skipped"] == again["totals"]["shards"]
    redo = run_embed(str(fashion_shards), EmbedOptions(tiny_checkpoint, str(embedded), score="elbo"))
    assert redo["totals"]["shards_skipped"] == 0 and _rows(embedded)["elbo"].notna().all()


def test_checkpoint_without_quantiles_gives_null_percentiles(fashion_shards, tiny_checkpoint, tmp_path):
    ckpt = load_checkpoint(tiny_checkpoint)
    plain = tmp_path / "plain.safetensors"
    save_checkpoint(ckpt.model, str(plain), {})
    out = tmp_path / "out"
    run_embed(str(fashion_shards), EmbedOptions(str(plain), str(out)))
    df = _rows(out)
    assert df["anomaly_percentile"].isna().all() and df["is_anomaly"].isna().all()


def test_typicality_score_column_and_missing_reference(fashion_shards, tiny_checkpoint, tmp_path):
    from vae_model.errors import ConfigError

    out = tmp_path / "out"
    run_embed(str(fashion_shards), EmbedOptions(tiny_checkpoint, str(out), score="typicality"))
    df = _rows(out)
    assert df["typicality"].notna().all() and np.allclose(df["anomaly_score"], df["typicality"])
    assert df["complexity"].notna().all() and df["anomaly_percentile"].between(0, 100).all()
    ckpt = load_checkpoint(tiny_checkpoint)
    old = tmp_path / "old.safetensors"
    save_checkpoint(ckpt.model, str(old), {k: v for k, v in ckpt.meta.items() if k != "typicality"})
    with pytest.raises(ConfigError, match="typicality reference"):
        run_embed(str(fashion_shards), EmbedOptions(str(old), str(tmp_path / "o2"), score="typicality"))
    assert not (tmp_path / "o2").exists()


def test_progress_reports_shards_done_and_images(fashion_shards, tiny_checkpoint, tmp_path):
    seen = []
    from pipeline.embed import output_name
    from pipeline.progress import ProgressWatcher
    from pipeline.shards import expand_shards

    out = tmp_path / "out"
    specs = expand_shards(str(fashion_shards))
    watcher = ProgressWatcher(str(out), [output_name(s) for s in specs], seen.append, interval=0.05)
    with watcher:
        run_embed(str(fashion_shards), EmbedOptions(tiny_checkpoint, str(out)), on_progress=lambda p: None)
    final = watcher.poll()
    assert (final.shards_done, final.shards_total, final.images) == (3, 3, 600)
    assert all(p.shards_total == 3 and 0 <= p.shards_done <= 3 for p in seen)
    assert "shards 3/3, 600 images" in str(final)


def test_recalibrated_checkpoint_reruns_shards(fashion_shards, mnist_shards, tiny_checkpoint, tmp_path):
    import shutil

    from jobs.calibrate import calibrate

    ck = tmp_path / "m.safetensors"
    shutil.copy(tiny_checkpoint, ck)
    out = tmp_path / "out"
    run_embed(str(fashion_shards), EmbedOptions(str(ck), str(out), score="typicality"))
    before = _rows(out)
    rec = calibrate(str(ck), str(mnist_shards), limit=100, iwae_k=2)  # another reference: other scores
    assert rec["model_id"] == load_checkpoint(tiny_checkpoint).model_id and rec["images"] == 100
    again = run_embed(str(fashion_shards), EmbedOptions(str(ck), str(out), score="typicality"))
    assert again["totals"]["shards_skipped"] == 0
    after = _rows(out)
    np.testing.assert_allclose(np.stack(after["embedding"]), np.stack(before["embedding"]))
    assert not np.allclose(after["typicality"], before["typicality"])
    assert run_embed(str(fashion_shards), EmbedOptions(str(ck), str(out), score="typicality"))[
        "totals"]["shards_skipped"] == 3
