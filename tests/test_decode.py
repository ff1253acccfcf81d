"""decode_image: every common mode and format becomes uint8 (C, size, size); bad bytes raise ImageDecodeError."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.decode import SUPPORTED_EXTS, ImageTooLargeError, decode_image, decode_with
from vae_model.errors import ConfigError, ImageDecodeError


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def test_supported_exts():
    assert set(SUPPORTED_EXTS) >= {"png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff", "avif", "heic"}
    assert all(e == e.lower() and "." not in e for e in SUPPORTED_EXTS)


def _photo(w: int = 40, h: int = 30) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 90)], -1).astype(np.uint8))


@pytest.mark.parametrize("fmt, lossless", [("GIF", False), ("TIFF", True), ("AVIF", False), ("JPEG2000", False),
                                           ("PPM", True), ("TGA", True), ("HEIF", False)])
def test_other_formats_decode_like_png(fmt, lossless):
    if fmt == "HEIF":
        pytest.importorskip("pillow_heif")  # a test dependency: the [heif] extra
    img = _photo()
    want = decode_image(encode(img), 3, 16, resize="squash")
    got = decode_image(encode(img, fmt), 3, 16, resize="squash")
    assert got.shape == (3, 16, 16) and got.dtype == np.uint8
    diff = np.abs(got.astype(int) - want).mean()
    assert diff == 0 if lossless else diff < 12, (fmt, diff)


@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "WEBP"])
def test_animated_or_multi_page_gives_the_first_frame(fmt):
    frames = [Image.new("RGB", (8, 8), c) for c in ((250, 250, 250), (0, 0, 0), (120, 120, 120))]
    buf = io.BytesIO()
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], **({"lossless": True} if fmt == "WEBP" else {}))
    assert (decode_image(buf.getvalue(), 1, 8) == 250).all()


def test_heif_without_pillow_heif_is_a_one_line_dead_letter_reason():
    import subprocess
    import sys

    heic = b"\x00\x00\x00\x1cftypheic\x00\x00\x00\x00mif1heic" + bytes(64)
    code = ("import sys; sys.modules['pillow_heif'] = None\n"  # as if the [heif] extra were not installed
            "from pipeline.decode import decode_image\n"
            "from vae_model.errors import ImageDecodeError\n"
            "try:\n    decode_image(sys.stdin.buffer.read(), 3, 8)\n"
            "except ImageDecodeError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], input=heic, capture_output=True, check=True).stdout.decode()
    assert "HEIC/HEIF needs pillow-heif" in out and "vaepipe[heif]" in out and out.count("\n") == 1


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "I;16", "I", "F"])
def test_every_mode_gives_uint8_chw(mode, channels):
    fmt = "TIFF" if mode in ("CMYK", "I", "F", "PA") else "PNG"
    if mode == "PA":  # Pillow cannot save PA; a palette PNG with a transparent index opens as P + transparency
        img, kwargs = Image.new("P", (12, 12), 0), {"transparency": 0}
        fmt = "PNG"
    else:
        img, kwargs = Image.new(mode, (12, 12)), {}
    out = decode_image(encode(img, fmt, **kwargs), channels, 12)
    assert out.shape == (channels, 12, 12)
    assert out.dtype == np.uint8
    assert out.flags.c_contiguous


def test_grayscale_values_survive_exactly():
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16)
    out = decode_image(encode(Image.fromarray(arr)), 1, 16)
    assert np.array_equal(out[0], arr)


def test_rgb_keeps_channel_order_and_gray_is_replicated():
    out = decode_image(encode(Image.new("RGB", (4, 4), (200, 100, 50))), 3, 4)
    assert out[:, 0, 0].tolist() == [200, 100, 50]
    gray = decode_image(encode(Image.new("L", (4, 4), 77)), 3, 4)
    assert (gray == 77).all()


def test_transparency_is_composited_over_white():
    clear = encode(Image.new("RGBA", (4, 4), (10, 20, 30, 0)))
    assert (decode_image(clear, 1, 4) == 255).all()
    assert (decode_image(clear, 3, 4) == 255).all()
    opaque = encode(Image.new("RGBA", (4, 4), (10, 20, 30, 255)))
    assert decode_image(opaque, 3, 4)[:, 0, 0].tolist() == [10, 20, 30]
    half = encode(Image.new("LA", (4, 4), (0, 128)))  # black at 50% over white
    assert decode_image(half, 1, 4)[0, 0, 0] == 127


def test_palette_with_transparent_index_is_white_and_others_keep_colour():
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    img.putpixel((0, 0), 0)
    out = decode_image(encode(img, transparency=0), 3, 4)
    assert out[:, 0, 0].tolist() == [255, 255, 255]  # transparent index
    assert out[:, 1, 1].tolist() == [255, 0, 0]


def test_16_bit_is_scaled_not_clipped():
    arr = np.array([[0, 255, 256, 65535]], dtype=np.uint16).repeat(4, axis=0)
    out = decode_image(encode(Image.fromarray(arr)), 1, 4)  # 16-bit grayscale PNG, opens as I;16
    assert out[0, 0].tolist() == [0, 0, 1, 255]


def test_16_bit_big_endian_mode():
    img = Image.fromarray(np.full((4, 4), 0x8000, dtype=np.uint16)).convert("I").convert("I;16B")
    assert img.mode == "I;16B"
    out = decode_image(encode(img, "TIFF"), 1, 4)
    assert (out == 128).all()


def test_float_in_unit_range_is_scaled():
    out = decode_image(encode(Image.fromarray(np.full((4, 4), 0.5, np.float32)), "TIFF"), 1, 4)
    assert (out == 128).all()


def test_bilevel_is_0_or_255():
    img = Image.new("1", (4, 4), 0)
    img.putpixel((0, 0), 1)
    out = decode_image(encode(img), 1, 4)
    assert out[0, 0, 0] == 255 and out[0, 1, 1] == 0


def test_cmyk_white():
    out = decode_image(encode(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG", quality=95), 3, 8)
    assert (out >= 250).all()


@pytest.mark.parametrize("fmt,kwargs", [("JPEG", {"quality": 95}), ("WEBP", {"lossless": True}), ("BMP", {})])
def test_other_formats(fmt, kwargs):
    out = decode_image(encode(Image.new("RGB", (16, 16), (0, 128, 255)), fmt, **kwargs), 3, 16)
    assert out.shape == (3, 16, 16)
    assert np.abs(out[:, 8, 8].astype(int) - [0, 128, 255]).max() <= 3


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_is_applied(fmt):
    img = Image.new("L", (20, 10), 0)  # 20 wide, 10 tall; the left half is white
    img.paste(255, (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view": the left half becomes the top half
    out = decode_image(encode(img, fmt, exif=exif.tobytes()), 1, 10)[0]
    # viewed 10 x 20 (W x H), centre-cropped to rows 5..15: top 5 rows white, bottom 5 black
    assert out[:4].min() > 200 and out[6:].max() < 50


def test_non_square_is_resized_on_short_side_and_center_cropped():
    arr = np.zeros((20, 60), dtype=np.uint8)  # H=20, W=60: only the middle third survives the crop
    arr[:, 20:40] = 255
    out = decode_image(encode(Image.fromarray(arr)), 1, 10)
    assert out.shape == (1, 10, 10)
    assert (out[:, :, 1:-1] == 255).all()  # the antialiasing filter sees past the crop at its edges only
    assert (out[:, :, [0, -1]] > 200).all()
    up = decode_image(encode(Image.fromarray(arr)), 1, 40)  # upscaling path (BICUBIC)
    assert up.shape == (1, 40, 40)
    assert up[0, 20, 20] == 255


def test_exact_size_is_untouched():
    arr = np.random.default_rng(0).integers(0, 256, (3, 9, 9), dtype=np.uint8)
    out = decode_image(encode(Image.fromarray(arr.transpose(1, 2, 0))), 3, 9)
    assert np.array_equal(out, arr)


@pytest.mark.parametrize("data", [b"", b"hello, not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_garbage_raises(data):
    with pytest.raises(ImageDecodeError, match="cannot decode image"):
        decode_image(data, 1, 8)


def test_truncated_png_raises_with_pillow_reason():
    noise = np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)
    png = encode(Image.fromarray(noise))
    with pytest.raises(ImageDecodeError, match="truncated") as info:
        decode_image(png[: len(png) // 2], 1, 8)
    assert "\n" not in str(info.value)


def test_decompression_bomb_raises():
    png = bytearray(encode(Image.new("L", (1, 1))))
    # Rewrite IHDR to claim 30000 x 30000 pixels (over twice Image.MAX_IMAGE_PIXELS), fixing its CRC.
    png[16:24] = struct.pack(">II", 30000, 30000)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    with pytest.raises(ImageTooLargeError, match=r"900000000 pixels\) exceeds limit.*decompression bomb") as info:
        decode_image(bytes(png), 1, 8, max_pixels=10 ** 12)  # Pillow refuses it in Image.open, before our check
    assert info.value.error_type == "ImageTooLarge" and "\n" not in str(info.value)


def test_bad_arguments():
    png = encode(Image.new("L", (4, 4)))
    with pytest.raises(ConfigError):
        decode_image(png, 2, 4)
    with pytest.raises(ConfigError):
        decode_image(png, 1, 0)


# ----------------------------------------------------------------------------- bounded decode (issue 10)

from pipeline.decode import _over_white  # noqa: E402


def huge_canvas_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels (CRC fixed)."""
    png = bytearray(encode(Image.new("RGBA", (1, 1))))
    png[16:24] = struct.pack(">II", width, height)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


def test_too_many_pixels_is_refused_from_the_header():
    with pytest.raises(ImageTooLargeError, match=r"13000 x 13000 = 169000000 pixels.*--max-pixels"):
        decode_image(huge_canvas_png(13000, 13000), 1, 8)  # would decode below Pillow's bomb error
    ok = encode(Image.new("L", (100, 50), 9))
    assert decode_image(ok, 1, 8, max_pixels=5000).shape == (1, 8, 8)
    with pytest.raises(ImageTooLargeError, match="over the limit of 4999"):
        decode_image(ok, 1, 8, max_pixels=4999)


def test_alpha_over_white_matches_the_exact_formula():
    rng = np.random.default_rng(0)
    for mode, bands in (("RGBA", 4), ("LA", 2)):
        arr = rng.integers(0, 256, (64, 64, bands), dtype=np.uint8)
        wide = arr.astype(np.uint16)
        colour, alpha = wide[..., :-1], wide[..., -1:]
        expected = (colour * alpha + 255 * (255 - alpha) + 127) // 255
        got = np.asarray(_over_white(Image.fromarray(arr, mode)))
        got = got[..., None] if got.ndim == 2 else got
        assert np.abs(got.astype(int) - expected).max() <= 1


def test_large_jpeg_draft_decode_stays_close():
    y, x = np.mgrid[0:1200, 0:1600]
    smooth = np.stack([(x / 1600 * 255), (y / 1200 * 255), ((x + y) % 256)], -1)
    smooth[..., 2] = 128 + 100 * np.sin(x / 60.0) * np.cos(y / 45.0)
    jpeg = encode(Image.fromarray(smooth.astype(np.uint8)), "JPEG", quality=92)
    full = Image.open(io.BytesIO(jpeg)).convert("RGB").resize((43, 32), Image.Resampling.BICUBIC).crop((5, 0, 37, 32))
    got = decode_image(jpeg, 3, 32)
    diff = np.abs(got.astype(int) - np.asarray(full).transpose(2, 0, 1))
    assert diff.max() <= 6 and diff.mean() < 1


def test_unknown_resize_policy_is_a_config_error():
    with pytest.raises(ConfigError, match="--resize stretch"):
        decode_image(encode(Image.new("L", (4, 4))), 1, 4, resize="stretch")


def test_pad_centres_the_whole_image_on_white():
    arr = np.zeros((20, 60), dtype=np.uint8)  # black, 3:1
    out = decode_image(encode(Image.fromarray(arr)), 1, 12, resize="pad")[0]
    assert out.shape == (12, 12)
    assert (out[:4] == 255).all() and (out[8:] == 255).all()  # 12 x 4 of image, 4 rows of white each side
    assert (out[4:8] == 0).all()
    rgb = decode_image(encode(Image.new("RGB", (10, 30), (0, 0, 0))), 3, 9, resize="pad")  # 3 x 9: 3 columns each side
    assert (rgb[:, :, :3] == 255).all() and (rgb[:, :, 6:] == 255).all() and (rgb[:, :, 3:6] == 0).all()
    assert np.array_equal(decode_image(encode(Image.fromarray(arr[:, :20])), 1, 10, resize="pad"),
                          decode_image(encode(Image.fromarray(arr[:, :20])), 1, 10))  # square: same as a crop


def test_squash_keeps_every_column():
    arr = np.zeros((20, 60), dtype=np.uint8)
    arr[:, :20] = 255  # left third white: cropped away by center-crop, a third of a squash
    squash = decode_image(encode(Image.fromarray(arr)), 1, 12, resize="squash")[0]
    assert (squash[:, :3] == 255).all() and (squash[:, 5:] == 0).all()
    assert (decode_image(encode(Image.fromarray(arr)), 1, 12)[0, :, 1:] == 0).all()  # edge: filter support


def test_fast_path_keeps_the_geometry_of_a_rotated_photo():
    y, x = np.mgrid[0:1200, 0:1600]
    img = np.stack([x * 255 // 1600, y * 255 // 1200, 128 + 100 * np.sin(x / 40.0) * np.cos(y / 30.0)], -1)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: 1200 x 1600
    jpeg = encode(Image.fromarray(img.astype(np.uint8)), "JPEG", quality=92, exif=exif.tobytes())
    for resize in ("center-crop", "pad", "squash"):
        fast = decode_image(jpeg, 3, 32, resize=resize).astype(int)
        exact = decode_with(jpeg, 3, 32, resize=resize, draft_factor=None).astype(int)
        assert np.abs(fast - exact).mean() < 0.5, resize  # a one-pixel shift of this image costs > 2
    top_left = decode_image(jpeg, 3, 32, resize="squash")[:, 0, 0]
    assert top_left[0] < 40 and top_left[1] > 215  # rotated clockwise: the stored bottom-left is now top-left


def test_srgb_profile_changes_nothing():
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    assert np.array_equal(decode_image(encode(img, "PNG", icc_profile=srgb), 3, 10), decode_image(encode(img), 3, 10))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("orientation", range(0, 10))
def test_every_exif_orientation_is_shown_as_a_viewer_would(fmt, orientation):
    # 0 and 9 are not orientations: upright, as 1 is (the decoder skips exif_transpose for those)
    from PIL import ImageOps

    img = Image.fromarray(np.random.default_rng(orientation).integers(0, 256, (12, 18, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(img, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    viewed = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert viewed.size == ((12, 18) if orientation in (5, 6, 7, 8) else (18, 12))
    want = decode_image(encode(viewed, "PNG"), 3, 12)  # the viewed pixels, no EXIF
    got = decode_image(data, 3, 12)
    assert np.array_equal(got, want)


def test_the_pixel_limit_counts_what_a_drafted_jpeg_decodes():
    """A large baseline JPEG is decoded at a reduced DCT scale: the limit bounds that decode, so a 48 Mpx
    phone photo is no dead letter under the default; a PNG of the same size (decoded in full) and a
    progressive JPEG (its coefficients are buffered at full size) are refused."""
    photo = _photo(800, 600)
    jpeg, png = encode(photo, "JPEG", quality=90), encode(photo)
    assert decode_image(jpeg, 3, 64, max_pixels=100_000).shape == (3, 64, 64)  # drafted to 1/4: 200 x 150
    with pytest.raises(ImageTooLargeError, match=r"800 x 600 = 480000 pixels, over the limit of 100000"):
        decode_image(png, 3, 64, max_pixels=100_000)
    with pytest.raises(ImageTooLargeError, match=r"decoded at 1/4 scale still 200 x 150 = 30000, over the limit of 29999"):
        decode_image(jpeg, 3, 64, max_pixels=29_999)
    with pytest.raises(ImageTooLargeError, match="480000 pixels, over"):  # no draft asked: decoded in full
        decode_with(jpeg, 3, 64, max_pixels=100_000, draft_factor=None)
    progressive = encode(photo, "JPEG", quality=90, progressive=True)  # buffers full-size coefficients
    with pytest.raises(ImageTooLargeError, match="progressive JPEG holds all its coefficients at full size"):
        decode_image(progressive, 3, 64, max_pixels=100_000)
    assert decode_image(progressive, 3, 64, max_pixels=480_000).shape == (3, 64, 64)
