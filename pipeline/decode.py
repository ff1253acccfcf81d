"""Decode encoded image bytes into the ``uint8`` ``(C, H, W)`` arrays the model consumes.

One policy, shared by training and the Beam pipeline so the two can never disagree:

1. **Open, check the size, fully decode** with Pillow (``Image.open`` + ``.load()``), so truncated
   or corrupt files fail here rather than later. An image whose header declares more than
   ``max_pixels`` pixels (width x height; ``--max-pixels``) raises :class:`ImageTooLargeError`
   before any pixel is decoded: a tiny file can declare a huge canvas. A JPEG much larger than
   the target is decoded at a reduced scale (``Image.draft``: a power-of-two DCT scaling that
   keeps the short side at least four times ``size``), so the final resize still does most of the
   filtering (rows move by well under one grey level on average; BENCHMARKS.md has the figures).
   Any failure, including ``Image.DecompressionBombError`` (images over twice
   ``Image.MAX_IMAGE_PIXELS``), raises :class:`ImageDecodeError` with a one-line
   message that carries Pillow's reason. Truncated images are never padded
   (``ImageFile.LOAD_TRUNCATED_IMAGES`` is left alone).
2. **EXIF orientation** is applied (``ImageOps.exif_transpose``), as a viewer would show the photo.
3. **Mode conversion** to 8-bit ``L`` (``channels=1``) or ``RGB`` (``channels=3``):

   * transparency (``RGBA``, ``LA``, ``PA``, palette with a transparent colour, premultiplied
     ``RGBa``/``La``) is composited over **white** in 8 bits by Pillow (``paste`` with the alpha as
     mask; within one grey level of ``(c*a + 255*(255-a)) / 255``), so a fully transparent pixel
     reads 255;
   * 16-bit integers (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``) keep their high byte
     (``value >> 8``: 65535 -> 255, 256 -> 1), never clipped; 32-bit ``I`` is taken to hold the
     same 0..65535 range (Pillow's representation of 16-bit data) and is clipped to it first;
   * ``F`` (float) is read as 0..1 when all values lie in [0, 1] and as 0..255 otherwise
     (scaled, rounded, clipped; NaN -> 0);
   * ``1`` (bilevel) becomes 0/255; ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, palette go through
     Pillow's ``convert('RGB')``;
   * grayscale to ``RGB`` replicates the channel; colour to ``L`` uses Pillow's ITU-R 601-2 luma.
4. **Resize**: an image that is not already ``size x size`` has its shorter side resized to
   ``size`` (``Resampling.BOX`` when shrinking, ``Resampling.BICUBIC`` when enlarging) and is then
   centre-cropped to a square (the extra pixel of an odd margin goes to the right/bottom).

Files whose extension is in :data:`SUPPORTED_EXTS` are the ones shard readers treat as images;
the decoder itself sniffs the format from the bytes.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vae_model.errors import ConfigError, ImageDecodeError

SUPPORTED_EXTS: tuple[str, ...] = ("png", "jpg", "jpeg", "webp", "bmp")

_ALPHA_MODES = {"RGBA": "RGBA", "RGBa": "RGBA", "LA": "LA", "La": "LA", "PA": "RGBA"}
_INT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_DRAFT_FACTOR = 4  # JPEG draft keeps >= 4x the target side (the row differences it costs: BENCHMARKS.md)


class ImageTooLargeError(ImageDecodeError):
    """The image header declares more pixels than ``max_pixels``; nothing was decoded."""

    error_type = "ImageTooLarge"  # the dead letter's error_type


def decode_image(data: bytes, channels: int, size: int, max_pixels: int | None = None) -> np.ndarray:
    """Decode image bytes to a ``uint8`` array of shape ``(channels, size, size)``.

    Args:
        data: Encoded image bytes (PNG, JPEG, WebP, BMP, ... anything Pillow reads).
        channels: 1 for grayscale (``L``), 3 for ``RGB``.
        size: Output height and width in pixels.
        max_pixels: Largest width x height decoded (default
            :data:`pipeline.options.DEFAULT_MAX_PIXELS`), checked from the header before decoding.

    Raises:
        ImageTooLargeError: The header declares more than ``max_pixels`` pixels.
        ImageDecodeError: The bytes are empty, truncated, corrupt, not an image, or a
            decompression bomb.
        ConfigError: ``channels`` is not 1 or 3, or ``size`` is not positive.
    """
    if max_pixels is None:
        from pipeline.options import DEFAULT_MAX_PIXELS  # options imports the shard reader, which imports us

        max_pixels = DEFAULT_MAX_PIXELS
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    if size < 1:
        raise ConfigError(f"image size must be a positive number of pixels, got {size}")
    if not data:
        raise ImageDecodeError("cannot decode image: empty data (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > max_pixels:
            raise ImageTooLargeError(f"image is {w} x {h} = {w * h} pixels, over the limit of {max_pixels} "
                                     "(--max-pixels); raise --max-pixels to decode it")
        if img.format == "JPEG" and min(w, h) >= 2 * _DRAFT_FACTOR * size:
            img.draft(img.mode, (_DRAFT_FACTOR * size,) * 2)  # DCT scaling: short side stays >= 4 x size
        img.load()
        img = ImageOps.exif_transpose(img)
    except ImageTooLargeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(f"cannot decode image ({len(data)} bytes): not a recognised image format "
                               f"(starts with {data[:8].hex()})") from None
    except Exception as exc:  # Pillow's format plugins raise many exception types on bad data
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise ImageDecodeError(f"cannot decode image ({len(data)} bytes): {reason}") from None
    img = _to_8bit(img, gray=channels == 1)
    img = img.convert("L" if channels == 1 else "RGB")
    img = _resize_center_crop(img, size)
    arr = np.asarray(img, dtype=np.uint8)
    if channels == 1:
        return np.ascontiguousarray(arr[None])  # (1, H, W)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))  # (3, H, W)


def _to_8bit(img: Image.Image, gray: bool = False) -> Image.Image:
    """Return an 8-bit ``L`` or ``RGB`` image: alpha over white, high-bit-depth data rescaled.

    ``gray``: the caller wants ``L``; transparency is then composited in ``LA`` (luma is linear, so
    that is the same image to rounding) at half the memory of ``RGBA``.
    """
    mode = img.mode
    if mode in ("L", "RGB"):
        return img
    if mode == "P":
        # A palette image may declare a transparent index; RGBA conversion honours it.
        mode = "PA" if "transparency" in img.info else "RGB"
        if mode == "RGB":
            return img.convert("RGB")
    if mode in _ALPHA_MODES:
        if img.mode != _ALPHA_MODES[mode]:  # P, PA and premultiplied RGBa/La first become RGBA/LA
            img = img.convert(_ALPHA_MODES[mode])
        return _over_white(img.convert("LA") if gray and img.mode == "RGBA" else img)
    if mode in _INT16_MODES:
        arr = np.asarray(img).astype(np.uint16)  # native byte order whatever the mode's
        return Image.fromarray((arr >> 8).astype(np.uint8))
    if mode == "I":
        arr = np.clip(np.asarray(img), 0, 65535).astype(np.uint16)
        return Image.fromarray((arr >> 8).astype(np.uint8))
    if mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    if mode == "1":
        return img.convert("L")
    return img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX, ...


def _over_white(img: Image.Image) -> Image.Image:
    """Composite an ``LA`` or ``RGBA`` image over white, returning ``L`` or ``RGB``.

    Pillow's 8-bit blend in C: one ``L``/``RGB`` canvas and one converted copy, no widened arrays
    (a numpy uint16 formula cost about 30 bytes per pixel).
    """
    mode = "L" if img.mode == "LA" else "RGB"
    out = Image.new(mode, img.size, 255 if mode == "L" else (255, 255, 255))
    out.paste(img.convert(mode), (0, 0), img.getchannel("A"))
    return out


def _resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BICUBIC
        img = img.resize((new_w, new_h), resample)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))
