"""The vector index on real embed output: build, nightly increments, refusals, search by key and by image,
on local disk and on SeaweedFS."""
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from jobs.cli import cli
from pipeline import build_index, open_index
from pipeline.index import (HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M, IVF_NPROBE, LEGACY_HNSW, SIDECAR, VectorIndex,
                            VectorIndexError, ivf_lists, load_index, save_index)
from pipeline.options import EmbedOptions
from pipeline.run import run_embed
from vae_model.checkpoint import load_checkpoint, save_checkpoint

DAY1, DAY2, DAY3 = "2026-11-01", "2026-11-02", "2026-11-03"


@pytest.fixture(scope="module")
def latents(tmp_path_factory, fashion_shards, mnist_shards, tiny_checkpoint) -> Path:
    """Three nightly partitions of one model: Fashion-MNIST, MNIST, then Fashion-MNIST again (same keys)."""
    out = tmp_path_factory.mktemp("latents") / "latents"
    run_embed(str(fashion_shards), EmbedOptions(tiny_checkpoint, str(out), run_date=DAY1))
    run_embed(str(mnist_shards), EmbedOptions(tiny_checkpoint, str(out), run_date=DAY2, score="none"))
    run_embed(str(fashion_shards), EmbedOptions(tiny_checkpoint, str(out), run_date=DAY3))
    return out


def _rows(latents: Path, day: str):
    return pads.dataset(str(latents / f"dt={day}"), format="parquet", ignore_prefixes=["_", "."]).to_table()


def _first_member(shards: Path) -> tuple[str, bytes]:
    """(row key, PNG bytes) of the first image of the first shard."""
    shard = sorted(shards.glob("*.tar"))[0]
    with tarfile.open(shard) as tf:
        png = next(m for m in tf.getmembers() if m.name.endswith(".png"))
        return f"{shard}/{png.name.rsplit('.', 1)[0]}", tf.extractfile(png).read()


def test_build_then_nightly_increments_never_duplicate_keys(latents, tmp_path):
    index_url = str(tmp_path / "index")
    first = build_index(str(latents), index_url, run_date=DAY1)
    n1 = _rows(latents, DAY1).num_rows
    assert first["added"] == first["count"] == n1 and first["partitions"] == [f"dt={DAY1}"]
    second = build_index(str(latents), index_url)  # every partition: only the two new ones are read
    assert second["partitions_added"] == [f"dt={DAY2}", f"dt={DAY3}"]
    assert second["added"] == _rows(latents, DAY2).num_rows  # day 3 holds day 1's keys again
    assert second["duplicates_skipped"] == _rows(latents, DAY3).num_rows
    again = build_index(str(latents), index_url)
    assert again["added"] == 0 and again["count"] == n1 + _rows(latents, DAY2).num_rows

    idx = open_index(index_url)
    keys = idx.index.rows_table().column("key").to_pylist()
    assert len(keys) == len(set(keys)) == again["count"]
    meta = json.loads((tmp_path / "index" / SIDECAR).read_text())
    assert meta["model_id"] == _rows(latents, DAY1).column("model_id")[0].as_py()
    assert meta["metric"] == "cosine" and meta["kind"] == "hnsw" and meta["count"] == len(keys)
    assert [p["name"] for p in meta["partitions"]] == [f"dt={DAY1}", f"dt={DAY2}", f"dt={DAY3}"]
    assert meta["calibration"] and meta["partitions"][0]["files"]
    # only the current and the previous generation's files are kept
    assert len(list((tmp_path / "index").glob("vectors-*.faiss"))) == 2


def test_another_model_is_refused_with_one_line(latents, fashion_shards, tiny_checkpoint, tmp_path):
    index_url = str(tmp_path / "index")
    build_index(str(latents), index_url, run_date=DAY1)
    ckpt = load_checkpoint(tiny_checkpoint)
    with torch.no_grad():
        next(ckpt.model.parameters()).add_(0.01)
    other = tmp_path / "other.safetensors"
    save_checkpoint(ckpt.model, str(other), ckpt.meta)
    run_embed(str(fashion_shards), EmbedOptions(str(other), str(latents), run_date="2026-11-09"))
    try:
        with pytest.raises(VectorIndexError, match="a new model needs a new index"):
            build_index(str(latents), index_url)
        res = CliRunner().invoke(cli, ["index", str(latents), "--out", index_url, "--run-date", "2026-11-09"])
        assert res.exit_code == 1 and "a new model needs a new index" in res.output
        assert len(res.output.strip().splitlines()) == 1
        assert open_index(index_url).meta["count"] == _rows(latents, DAY1).num_rows  # untouched
    finally:
        import shutil

        shutil.rmtree(latents / "dt=2026-11-09")
        shutil.rmtree(latents / "errors" / "dt=2026-11-09", ignore_errors=True)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_search_by_key_returns_the_key_first(latents, tmp_path, kind):
    index_url = str(tmp_path / "index")
    build_index(str(latents), index_url, kind=kind, metric="l2", run_date=DAY1)
    idx = open_index(index_url)
    rows = _rows(latents, DAY1).to_pylist()
    for row in rows[::97]:
        hits = idx.search_key(row["key"], k=5)
        assert hits[0].key == row["key"] and hits[0].distance == 0.0 and len(hits) == 5
        assert hits[0].label == row["label"] and hits[0].anomaly_score == pytest.approx(row["anomaly_score"])
        assert all(a.distance <= b.distance for a, b in zip(hits[1:], hits[2:]))
    # vectors: the stored embedding finds its own row
    emb = np.array([rows[0]["embedding"]], dtype=np.float32)
    assert idx.search(emb, 3)[0][0].key == rows[0]["key"]


def _centroids(index: VectorIndex) -> np.ndarray:
    import faiss

    return faiss.downcast_index(index.faiss_index.quantizer).reconstruct_n(0, index.nlist)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_ivf_reuses_its_trained_lists_for_later_partitions(latents, tmp_path, metric):
    index_url = str(tmp_path / "index")
    res = CliRunner().invoke(cli, ["index", str(latents), "--out", index_url, "--kind", "ivf", "--metric", metric,
                                   "--run-date", DAY1], catch_exceptions=False)
    first = json.loads(res.output)
    n1 = _rows(latents, DAY1).num_rows
    meta = json.loads((tmp_path / "index" / SIDECAR).read_text())
    nlist = ivf_lists(n1)
    assert 1 < nlist < 4 * n1 ** 0.5  # a small first build gets fewer lists (39 rows per list at least)
    assert meta["kind"] == "ivf" and meta["ivf"]["nlist"] == nlist and meta["ivf"]["trained_on"] == first["count"] == n1
    assert meta["ivf"]["nprobe"] == min(IVF_NPROBE, nlist)
    centroids = _centroids(load_index(index_url))

    second = build_index(str(latents), index_url)  # the kind comes from the sidecar
    assert second["kind"] == "ivf" and second["added"] == _rows(latents, DAY2).num_rows
    assert second["duplicates_skipped"] == _rows(latents, DAY3).num_rows
    with pytest.raises(VectorIndexError, match="is a ivf index"):
        build_index(str(latents), index_url, kind="hnsw")
    idx = load_index(index_url)
    meta = json.loads((tmp_path / "index" / SIDECAR).read_text())
    assert idx.nlist == meta["ivf"]["nlist"] == nlist and meta["ivf"]["trained_on"] == n1 and meta["count"] == len(idx)
    np.testing.assert_array_equal(_centroids(idx), centroids)  # the quantizer is not retrained
    keys = idx.rows_table().column("key").to_pylist()
    assert len(keys) == len(set(keys))

    # every list scanned: the exact neighbours, as a flat index finds them
    day2 = _rows(latents, DAY2).to_pylist()
    flat = VectorIndex.new(idx.dim, metric=metric, kind="flat")
    flat.add(keys, np.stack([idx.vector(k) for k in keys]))
    idx.nprobe = nlist
    queries = np.array([r["embedding"] for r in day2[::50]], dtype=np.float32)
    assert [[h.key for h in hits] for hits in idx.search(queries, 5)] == \
        [[h.key for h in hits] for hits in flat.search(queries, 5)]
    assert idx.search_key(day2[0]["key"], 3)[0].key == day2[0]["key"]
    with pytest.raises(VectorIndexError, match="at least 1"):
        idx.nprobe = 0


def test_ivf_first_build_of_several_partitions_sizes_its_lists_on_all_of_them(latents, tmp_path):
    index_url = str(tmp_path / "index")
    res = build_index(str(latents), index_url, kind="ivf")  # three partitions, day 3 repeats day 1's keys
    n = _rows(latents, DAY1).num_rows + _rows(latents, DAY2).num_rows
    meta = json.loads((tmp_path / "index" / SIDECAR).read_text())
    assert res["count"] == meta["ivf"]["trained_on"] == n and meta["ivf"]["nlist"] == ivf_lists(n)
    assert res["partitions_added"] == [f"dt={DAY1}", f"dt={DAY2}", f"dt={DAY3}"]
    assert [p["rows"] for p in meta["partitions"]] == [_rows(latents, DAY1).num_rows, _rows(latents, DAY2).num_rows, 0]


def test_ivf_below_one_list_of_rows_is_an_exact_scan():
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((30, 8)).astype(np.float32)
    idx = VectorIndex.new(8, metric="l2", kind="ivf")
    assert len(idx.search(vectors[:1], 3)[0]) == 0  # empty and untrained: no hits, no error
    assert idx.add([f"k{i}" for i in range(30)], vectors) == 30
    assert idx.nlist == 1 and idx.nprobe == 1
    hits = idx.search(vectors[:1] + 0.01, 30)[0]
    d = np.linalg.norm(vectors - (vectors[0] + 0.01), axis=1)
    assert [h.key for h in hits] == [f"k{i}" for i in np.argsort(d)]
    assert idx.add(["k0", "k30"], vectors[:2]) == 1  # a key is never added twice
    with pytest.raises(VectorIndexError, match="ivf indexes"):
        VectorIndex.new(8, kind="hnsw").nprobe = 4


def test_search_by_image_encodes_with_the_index_model(latents, fashion_shards, tmp_path):
    index_url = str(tmp_path / "index")
    build_index(str(latents), index_url)
    key, png = _first_member(fashion_shards)
    idx = open_index(index_url)
    hits = idx.search([png], k=10)[0]
    assert hits[0].key == key and hits[0].distance < 1e-5 and len(hits) == 10
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("L"))[None, None]
    assert idx.search(pixels, k=1)[0][0].key == key  # decoded uint8 images work too

    image = tmp_path / "query.png"
    image.write_bytes(png)
    grid = tmp_path / "grid.png"
    res = CliRunner().invoke(cli, ["search", index_url, "--image", str(image), "-k", "4", "--grid", str(grid)],
                             catch_exceptions=False)
    lines = [json.loads(line) for line in res.output.strip().splitlines()]
    assert res.exit_code == 0 and lines[0]["key"] == key and len(lines) == 4
    assert set(lines[0]) == {"key", "distance", "label", "anomaly_score"}
    assert Image.open(grid).size == (5 * 30 + 2, 32)  # query + 4 neighbours, 28 px + 2 px padding

    res = CliRunner().invoke(cli, ["search", index_url, "--key", key, "-k", "3", "--grid", str(grid)],
                             catch_exceptions=False)
    assert [json.loads(line)["key"] for line in res.output.splitlines()][0] == key
    assert Image.open(grid).size == (3 * 30 + 2, 32)  # query + the 2 other neighbours

    res = CliRunner().invoke(cli, ["search", index_url, "--key", key, "-k", "3", "--ef-search", "12"])
    assert res.exit_code == 0 and json.loads(res.output.splitlines()[0])["key"] == key
    res = CliRunner().invoke(cli, ["search", index_url, "--key", key, "--nprobe", "4"])
    assert res.exit_code != 0 and "nprobe is a setting of ivf indexes" in res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_index_on_seaweedfs(latents, fashion_shards, s3_bucket, s3_server, kind):
    so = s3_server.storage_options
    index_url = f"{s3_bucket}/index-{kind}"
    first = build_index(str(latents), index_url, kind=kind, run_date=DAY1, storage_options=so)
    second = build_index(str(latents), index_url, storage_options=so)
    assert second["kind"] == kind
    assert second["count"] == first["count"] + second["added"] and second["added"] > 0
    assert s3_server.filesystem().exists(f"{index_url.removeprefix('s3://')}/{SIDECAR}")
    key, png = _first_member(fashion_shards)
    idx = open_index(index_url, storage_options=so)
    assert idx.search_key(key, 3)[0].key == key
    assert idx.search([png], 3)[0][0].key == key
    res = CliRunner().invoke(cli, ["search", index_url, "--key", key, "-k", "2",
                                   "--storage-options", s3_server.storage_options_json], catch_exceptions=False)
    assert json.loads(res.output.splitlines()[0])["key"] == key


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_whitened_index_searches_in_whitened_space_and_keeps_its_transform(latents, tmp_path, kind):
    """--whiten: the first build's mean and covariance whiten every stored and every query vector;
    later partitions reuse the transform; the index cannot change its mind."""
    index_url = str(tmp_path / "white")
    first = build_index(str(latents), index_url, metric="l2", kind=kind, run_date=DAY1, whiten=True)
    assert first["whiten"]
    meta = json.loads((tmp_path / "white" / SIDECAR).read_text())
    w = meta["whiten"]
    raw = np.stack(_rows(latents, DAY1).column("embedding").to_numpy(zero_copy_only=False)).astype(np.float64)
    assert w["fitted_on"] == len(raw)
    np.testing.assert_allclose(w["mean"], raw.mean(0), rtol=1e-6, atol=1e-9)
    white = (raw - raw.mean(0)) @ np.asarray(w["matrix"])
    np.testing.assert_allclose(np.cov(white, rowvar=False), np.eye(raw.shape[1]), atol=1e-3)

    build_index(str(latents), index_url)  # days 2 and 3: same transform
    again = json.loads((tmp_path / "white" / SIDECAR).read_text())
    assert again["whiten"] == w and again["count"] == first["count"] + _rows(latents, DAY2).num_rows
    idx = load_index(index_url)
    # search by key: the key itself first, then what an exact scan in whitened space finds
    keys = idx.rows_table().column("key").to_pylist()
    stored = np.stack([idx.vector(k) for k in keys])
    probe = keys[7]
    hits = idx.search_key(probe, k=5)
    exact = np.argsort(((stored - stored[7]) ** 2).sum(1), kind="stable")[:5]
    assert hits[0].key == probe
    if kind == "flat":
        assert [h.key for h in hits] == [keys[i] for i in exact]
    # a raw query vector is whitened like the stored ones
    q = idx.search(raw[7:8], k=1)[0][0]
    assert q.key == probe and q.distance < 1e-3
    with pytest.raises(VectorIndexError, match="is a whitened index; --no-whiten needs a new index"):
        build_index(str(latents), index_url, whiten=False)
    with pytest.raises(VectorIndexError, match="is an unwhitened index; --whiten needs a new index"):
        plain = str(tmp_path / "plain")
        build_index(str(latents), plain, run_date=DAY1)
        build_index(str(latents), plain, whiten=True)


def test_whitening_needs_enough_rows_and_says_so(tiny_checkpoint, tmp_path):
    from pipeline.index import Whitening

    with pytest.raises(VectorIndexError, match=r"--whiten fits on the first build's rows: 5 are too few for 4 "
                                               r"dimensions \(need 8\)"):
        Whitening.fit(np.random.default_rng(0).normal(size=(5, 4)))
    r = CliRunner().invoke(cli, ["index", "--help"])
    assert "--whiten / --no-whiten" in r.output


def test_hnsw_settings_are_the_index_own_and_survive_a_reload(tmp_path):
    rng = np.random.default_rng(2)
    vectors = rng.standard_normal((300, 8)).astype(np.float32)
    idx = VectorIndex.new(8, metric="l2", kind="hnsw")
    idx.add([f"k{i}" for i in range(300)], vectors)
    assert idx.ef_search == HNSW_EF_SEARCH
    idx.ef_search = 40
    url = str(tmp_path / "idx")
    meta = save_index(idx, url)
    assert meta["hnsw"] == {"M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": 40}
    again = load_index(url)
    assert again.ef_search == 40 and again.search(vectors[:1], 1)[0][0].key == "k0"
    # an index written before efSearch was stored per index reads back with the settings it was built for
    sidecar = tmp_path / "idx" / SIDECAR
    old = json.loads(sidecar.read_text())
    del old["hnsw"]
    sidecar.write_text(json.dumps(old))
    assert load_index(url).ef_search == LEGACY_HNSW["ef_search"]
    with pytest.raises(VectorIndexError, match="at least 1"):
        again.ef_search = 0
    with pytest.raises(VectorIndexError, match="hnsw indexes"):
        VectorIndex.new(8, kind="ivf").ef_search = 4
