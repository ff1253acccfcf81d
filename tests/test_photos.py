"""Real photographs (tests/data/photos: mvtb-data crops, JPEG/PNG/WebP, mixed sizes) through the
decode policy and the whole chain: shards -> train (RGB, 32 px) -> embed, from disk and SeaweedFS."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
from click.testing import CliRunner
from PIL import Image, ImageCms

from jobs.cli import cli
from pipeline.decode import decode_image, decode_with
from pipeline.options import EmbedOptions
from pipeline.run import run_embed

PHOTOS = Path(__file__).resolve().parent / "data" / "photos"
FILES = sorted(p for p in PHOTOS.iterdir() if p.suffix in (".jpg", ".png", ".webp"))
# The documented tolerance of the fast path (pipeline.decode, step 5; BENCHMARKS.md "Photos: decode
# speed"): per image, the mean absolute difference from a full decode and one resize.
FAST_PATH_MEAN_TOLERANCE = 1.5
IMAGES_IN = 16 * 12 + 1  # the end-to-end folder: 16 versions of the slice and a truncated JPEG


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _data(name: str) -> bytes:
    return (PHOTOS / name).read_bytes()


def test_slice_is_small_and_mixed():
    assert 10 <= len(FILES) <= 14 and sum(p.stat().st_size for p in FILES) < 400_000
    formats = {Image.open(p).format for p in FILES}
    assert formats == {"JPEG", "PNG", "WEBP"}
    sizes = {Image.open(p).size for p in FILES}
    assert any(w > h for w, h in sizes) and any(w < h for w, h in sizes)


@pytest.mark.parametrize("resize", ["center-crop", "pad", "squash"])
@pytest.mark.parametrize("channels,size", [(3, 32), (1, 16), (3, 64)])
def test_every_photo_decodes_to_the_model_shape(resize, channels, size):
    for p in FILES:
        out = decode_image(p.read_bytes(), channels, size, resize=resize)
        assert out.shape == (channels, size, size) and out.dtype == np.uint8, p.name


def test_pad_keeps_the_whole_photo_on_white_margins():
    data = _data("flowers-q90.jpg")  # 360 x 240: at 48 px, 48 x 32 of photo and 8 px white above and below
    out = decode_image(data, 3, 48, resize="pad")
    assert (out[:, :8] == 255).all() and (out[:, -8:] == 255).all()
    photo = out[:, 8:-8]
    squashed = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((48, 32), Image.Resampling.BICUBIC))
    assert np.abs(photo.astype(int) - squashed.transpose(2, 0, 1)).mean() < 1.0
    portrait = decode_image(_data("church-portrait-q95.jpg"), 1, 48, resize="pad")  # 160 x 240: margins left/right
    assert (portrait[:, :, :8] == 255).all() and (portrait[:, :, -8:] == 255).all()
    assert portrait[:, :, 8:-8].mean() < 250


def test_squash_keeps_the_whole_photo_and_crop_its_centre():
    data = _data("flowers-q90.jpg")
    img = Image.open(io.BytesIO(data)).convert("RGB")
    squash = decode_image(data, 3, 40, resize="squash").transpose(1, 2, 0).astype(int)
    assert np.abs(squash - np.asarray(img.resize((40, 40), Image.Resampling.BICUBIC))).mean() < 1.0
    crop = decode_image(data, 3, 40).transpose(1, 2, 0).astype(int)  # the default: centre 240 x 240
    centre = np.asarray(img.crop((60, 0, 300, 240)).resize((40, 40), Image.Resampling.BICUBIC))
    assert np.abs(crop - centre).mean() < 1.0
    assert np.abs(crop - squash).mean() > 5  # three different images of one photo


def test_exif_orientation_6_is_applied():
    data = _data("roof-exif6-q90.jpg")
    stored = Image.open(io.BytesIO(data))
    assert stored.size == (300, 200) and stored.getexif()[0x0112] == 6
    upright = stored.convert("RGB").transpose(Image.Transpose.ROTATE_270)  # what a viewer shows: 200 x 300
    buf = io.BytesIO()
    upright.save(buf, "PNG")
    for resize in ("center-crop", "pad", "squash"):
        for size in (24, 64):  # 24: the DCT draft applies to the rotated photo too
            got = decode_image(data, 3, size, resize=resize).astype(int)
            want = decode_with(buf.getvalue(), 3, size, resize=resize).astype(int)
            assert np.abs(got - want).mean() < FAST_PATH_MEAN_TOLERANCE, (resize, size)
            unrotated = decode_with(_strip_exif(data), 3, size, resize=resize).astype(int)
            assert np.abs(got - unrotated).mean() > 10, (resize, size)


def _strip_exif(data: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("size", [16, 24, 32])
def test_fast_path_is_within_the_documented_tolerance(size):
    for p in FILES:
        data = p.read_bytes()
        for resize in ("center-crop", "pad", "squash"):
            fast = decode_image(data, 3, size, resize=resize).astype(int)
            exact = decode_with(data, 3, size, resize=resize, draft_factor=None, reducing_gap=None).astype(int)
            assert np.abs(fast - exact).mean() <= FAST_PATH_MEAN_TOLERANCE, (p.name, resize)


def test_the_draft_is_taken_on_the_large_jpegs():
    data = _data("parks-progressive-q85.jpg")  # 480 x 320: 16 px keeps 4 x 16 = 64 <= 320 / 2
    fast = decode_image(data, 3, 16)
    exact = decode_with(data, 3, 16, draft_factor=None)
    assert not np.array_equal(fast, exact)  # the fast path really is another path ...
    assert np.abs(fast.astype(int) - exact).mean() <= FAST_PATH_MEAN_TOLERANCE  # ... and close


def test_cmyk_jpeg_comes_out_in_the_right_colours():
    data = _data("greenscreen-cmyk-q90.jpg")
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    got = decode_image(data, 3, 32, resize="squash").astype(int)
    # the same photo as an RGB JPEG (make_photos.py converted it to CMYK from this)
    rgb = Image.open(io.BytesIO(data)).convert("RGB")  # Pillow: Adobe inverted CMYK -> RGB
    want = np.asarray(rgb.resize((32, 32), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    assert np.abs(got - want).mean() < 1.0
    green = got[1].mean() - (got[0].mean() + got[2].mean()) / 2
    assert green > 20  # a green screen stays green (an uninverted CMYK read would turn it magenta)


def test_embedded_adobe_rgb_profile_is_converted_to_srgb():
    data = _data("image3-adobergb-q90.jpg")
    img = Image.open(io.BytesIO(data))
    profile = ImageCms.ImageCmsProfile(io.BytesIO(img.info["icc_profile"]))
    assert "Adobe RGB" in ImageCms.getProfileDescription(profile)
    got = decode_image(data, 3, 32, resize="squash").astype(int)
    srgb = ImageCms.profileToProfile(img, profile, ImageCms.createProfile("sRGB"), outputMode="RGB")
    want = np.asarray(srgb.resize((32, 32), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    ignored = np.asarray(img.convert("RGB").resize((32, 32), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    assert np.abs(got - want).mean() < 1.5  # transformed after the resize: close to transforming first
    assert np.abs(got - ignored).mean() > 2 * np.abs(got - want).mean()


def test_rgba_photo_is_composited_over_white():
    out = decode_image(_data("road-rgba.png"), 3, 32, resize="squash")
    assert out[:, :, 0].mean() > 250  # the left edge is (almost) fully transparent
    assert out[:, :, -1].mean() < 200  # the right edge is the photo


# --------------------------------------------------------------------------- the whole chain

@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    """The slice as is (a/), 15 distinct variants of it in its own formats (mirrored, rotated,
    rescaled: 192 photos in all; calibration wants a few hundred distinct images) and one
    truncated JPEG."""
    root = tmp_path_factory.mktemp("photos") / "in"
    (root / "a").mkdir(parents=True)
    for p in FILES:
        shutil.copy(p, root / "a" / p.name)
    T = Image.Transpose
    hows = (None, T.FLIP_LEFT_RIGHT, T.FLIP_TOP_BOTTOM, T.ROTATE_90, T.ROTATE_180, T.ROTATE_270, T.TRANSPOSE,
            T.TRANSVERSE)
    variants = [(how, scale) for scale in (1.0, 0.8) for how in hows][1:]
    for i, (how, scale) in enumerate(variants):
        (root / f"v{i:02d}").mkdir()
        for p in FILES:
            img = Image.open(p)
            out = img.transpose(how) if how is not None else img
            if scale != 1.0:
                out = out.resize((round(out.width * scale), round(out.height * scale)), Image.Resampling.LANCZOS)
            out.save(root / f"v{i:02d}" / p.name, format=img.format, quality=90)
    (root / "a" / "broken.jpg").write_bytes(_data("flowers-q90.jpg")[:3000])
    return root


@pytest.fixture(scope="module")
def photo_run(photo_folder, tmp_path_factory):
    """``vaepipe shards`` -> ``vaepipe train --channels 3 --image-size 32 --resize pad`` (tiny)."""
    tmp = tmp_path_factory.mktemp("photo-run")
    shards = tmp / "shards"
    res = invoke("shards", photo_folder, shards, "--shard-size", 50)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["images"] == IMAGES_IN
    ckpt = tmp / "photo.safetensors"
    res = invoke("train", shards, "--out", ckpt, "--val", shards, "--channels", 3, "--image-size", 32,
                 "--resize", "pad", "--epochs", 1, "--batch-size", 16, "--latent-dim", 4, "--widths", "8,16",
                 "--hidden-dim", 32, "--kl-warmup-steps", 0, "--num-workers", 0, "--time-limit", 300, "--quiet")
    assert res.exit_code == 0, res.output
    return shards, ckpt


def _check_outputs(manifest: dict, rows, errors, images_in: int) -> None:
    assert manifest["reconciled"]
    assert manifest["totals"]["rows"] == rows.num_rows == images_in - 1
    assert manifest["totals"]["errors"] == errors.num_rows == 1
    err = errors.to_pydict()
    assert err["stage"] == ["decode"] and err["key"][0].endswith("a/broken")


def test_photos_train_and_embed_with_the_trained_resize_policy(photo_run, tmp_path):
    from vae_model.checkpoint_header import inspect_checkpoint

    shards, ckpt = photo_run
    info = inspect_checkpoint(str(ckpt))
    assert info.config.channels == 3 and info.config.image_size == 32
    assert info.meta["resize"] == "pad" and info.meta["train_config"]["resize"] == "pad"
    out = tmp_path / "out"
    res = invoke("embed", shards, "--checkpoint", ckpt, "--out", out, "--direct_num_workers=1", "--no-report")
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "_manifest.json").read_text())
    rows = pads.dataset(sorted(map(str, out.glob("*.parquet"))), format="parquet").to_table()
    errors = pads.dataset(str(out / "errors"), format="parquet").to_table()
    _check_outputs(manifest, rows, errors, IMAGES_IN)
    assert manifest["options"]["resize"] == "pad"  # the checkpoint's policy, without a flag
    # an explicit --resize overrides it, and changes the output key: skip-existing redoes the rows
    res = invoke("embed", shards, "--checkpoint", ckpt, "--out", out, "--direct_num_workers=1", "--no-report",
                 "--resize", "center-crop", "--mode", "overwrite")
    assert res.exit_code == 0, res.output
    again = json.loads((out / "_manifest.json").read_text())
    assert again["options"]["resize"] == "center-crop" and again["output_key"] != manifest["output_key"]
    assert again["totals"]["rows"] == IMAGES_IN - 1 and again["reconciled"]
    assert not any(s.get("skipped") for s in again["shards"])


def test_photos_embed_from_seaweedfs(photo_run, s3_bucket, s3_server, tmp_path):
    shards, ckpt = photo_run
    so = s3_server.storage_options
    fs = s3_server.filesystem()
    for p in sorted(shards.iterdir()):
        fs.put(str(p), f"{s3_bucket.removeprefix('s3://')}/shards/{p.name}")
    out = f"{s3_bucket}/out/"
    manifest = run_embed(f"{s3_bucket}/shards/*.tar", EmbedOptions(str(ckpt), out, batch_size=16, torch_threads=1,
                                                                   report=False, storage_options=so))
    assert manifest["options"]["resize"] == "pad"
    bucket = s3_bucket.removeprefix("s3://")
    rows = pads.dataset(sorted(fs.glob(f"{bucket}/out/*.parquet")), format="parquet", filesystem=fs).to_table()
    errors = pads.dataset(f"{bucket}/out/errors", format="parquet", filesystem=fs).to_table()
    _check_outputs(manifest, rows, errors, IMAGES_IN)
    local = run_embed(str(shards), EmbedOptions(str(ckpt), str(tmp_path / "local"), batch_size=16, torch_threads=1,
                                                report=False))
    assert local["output_key"] == manifest["output_key"]
    local_rows = pads.dataset(sorted(map(str, (tmp_path / "local").glob("*.parquet"))), format="parquet").to_table()
    a, b = _by_member(rows), _by_member(local_rows)
    assert len(a) == len(b) == IMAGES_IN - 1 and a.keys() == b.keys()
    assert np.allclose([a[k] for k in sorted(a)], [b[k] for k in sorted(a)], atol=1e-4)


def _by_member(table) -> dict:
    """elbo by (shard file name, member key): the same on disk and in a bucket."""
    return {(s.rsplit("/", 1)[-1], k[len(s) + 1:]): e for s, k, e in
            zip(*(table.column(c).to_pylist() for c in ("shard", "key", "elbo")))}
