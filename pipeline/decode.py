"""Decode encoded image bytes into the ``uint8`` ``(C, H, W)`` arrays the model consumes.

One policy, shared by training and the Beam pipeline so the two can never disagree:

1. **Open, check the size, fully decode** with Pillow (``Image.open`` + ``.load()``), so truncated
   or corrupt files fail here rather than later. An image that would decode to more than
   ``max_pixels`` pixels (width x height; ``--max-pixels``) raises :class:`ImageTooLargeError`
   before any pixel is decoded: a tiny file can declare a huge canvas. A JPEG much larger than
   the target is decoded at a reduced DCT scale (the fast path of step 5), and the limit
   applies to that decoded size: a 48 Mpx phone photo drafted to 1/8 decodes 0.76 Mpx, so it
   is no dead letter under the default 40 Mpx (its decode costs ~0.1 s and a few MB). A
   progressive JPEG counts at full size: libjpeg buffers all its coefficients whatever the
   scale (+144 MB for the same photo saved progressive). Any
   failure raises :class:`ImageDecodeError` with a one-line message that carries Pillow's reason;
   ``Image.DecompressionBombError`` (images over twice ``Image.MAX_IMAGE_PIXELS``, refused by
   Pillow while it reads the header) is an :class:`ImageTooLargeError`. Truncated images are
   never padded (``ImageFile.LOAD_TRUNCATED_IMAGES`` is left alone).
2. **EXIF orientation** is applied (``ImageOps.exif_transpose``), as a viewer would show the photo
   (after the DCT scaling, which is isotropic, so a photo rotated 90 degrees is scaled alike).
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
4. **Colour**: an RGB(A) or ``CMYK`` image with an embedded ICC profile that is not sRGB
   (Adobe RGB, Display P3, a camera or press CMYK profile, ...) is converted to sRGB with
   littlecms (``PIL.ImageCms``, perceptual intent; transforms cached per profile), on the
   resized pixels (a colour transform of a whole photo costs more than its decode; alpha is
   composited over white first). Images without a profile are taken to be sRGB; CMYK without
   one goes through Pillow's ``convert('RGB')`` (Pillow reads CMYK JPEGs with the Adobe
   inverted convention, as Photoshop writes them). Profiles of greyscale and palette images,
   and profiles littlecms cannot read, are ignored.
5. **Resize** (``resize``, :data:`RESIZE_POLICIES`; ``--resize``), after orientation:

   * ``center-crop`` (default): the shorter side is resized to ``size`` and the centre square kept
     (the extra pixel of an odd margin goes to the right/bottom); only the kept region is
     resampled (``resize(box=...)``);
   * ``pad``: the longer side is resized to ``size`` and the image centred on a **white** square
     (255, as transparency is: an image with no content there reads as a blank page);
   * ``squash``: both sides resized to ``size``, the aspect ratio ignored.

   The filter is Pillow's antialiased ``Resampling.BICUBIC`` both ways (its support widens with
   the reduction). **Fast path**: a JPEG is decoded at a reduced DCT scale (``Image.draft``, a
   power of two) that keeps each axis at least :data:`DRAFT_FACTOR` times its resized size, and
   other formats are box-reduced by an integer factor first (``resize(reducing_gap=...)``) that
   keeps at least :data:`REDUCING_GAP` times. The geometry (resized size, crop offsets) is
   computed on the full photo, so the fast path changes the filtering only: **tolerance**, per
   image, a mean absolute difference of at most 1.5 grey levels from a full decode and one
   resize (about 0.5 on average over photos; measured figures: BENCHMARKS.md, "Photos: decode
   speed"; a smoothing filter is what keeps this small: a box filter moved rows by up to ~5).

Files whose extension is in :data:`SUPPORTED_EXTS` are the ones shard readers treat as images
(JPEG, PNG, WebP, BMP, GIF, TIFF, AVIF, HEIC/HEIF with pillow-heif, JPEG 2000, PNM, TGA); the
decoder itself sniffs the format from the bytes. An animated GIF/WebP/AVIF or a multi-page TIFF
gives its first frame.
"""
from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.options import DEFAULT_MAX_PIXELS, DEFAULT_RESIZE, RESIZE_POLICIES
from vae_model.errors import ConfigError, ImageDecodeError

try:  # optional: HEIC/HEIF photos (phones) through pillow-heif's Pillow plugin
    import pillow_heif

    pillow_heif.register_heif_opener()
    HEIF_SUPPORTED = True
except ImportError:
    HEIF_SUPPORTED = False

# Image file extensions (lower case): what shard readers and folder listings take as images. The
# decoder sniffs the format from the bytes whatever the name says; a file with one of these names
# that does not decode is a dead letter, never skipped. HEIC/HEIF needs the optional pillow-heif
# (``pip install vaepipe[heif]``); without it such a file is a dead letter that says so.
SUPPORTED_EXTS: tuple[str, ...] = ("png", "jpg", "jpeg", "webp", "bmp", "jpe", "jfif", "gif", "tif", "tiff", "avif",
                                   "heic", "heif", "jp2", "j2k", "ppm", "pgm", "pbm", "pnm", "tga")
# ISO-BMFF brands of HEIF still images (bytes 8..12 of the file, after "ftyp").
HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")
PAD_VALUE = 255  # --resize pad fills with white, as transparency is composited
# Fast path (module docstring, step 5): the decoded/reduced image keeps >= this many times the
# resized size per axis before the final resize; the tolerance this gives: module docstring, step 5.
DRAFT_FACTOR = 2
REDUCING_GAP = 4.0

_ALPHA_MODES = {"RGBA": "RGBA", "RGBa": "RGBA", "LA": "LA", "La": "LA", "PA": "RGBA"}
_INT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ORIENTATION = 0x0112  # the EXIF orientation tag


class ImageTooLargeError(ImageDecodeError):
    """The image header declares more pixels than ``max_pixels``; nothing was decoded."""

    error_type = "ImageTooLarge"  # the dead letter's error_type


def decode_image(data: bytes, channels: int, size: int, max_pixels: int | None = None,
                 resize: str = DEFAULT_RESIZE) -> np.ndarray:
    """Decode image bytes to a ``uint8`` array of shape ``(channels, size, size)``.

    Args:
        data: Encoded image bytes (PNG, JPEG, WebP, BMP, ... anything Pillow reads).
        channels: 1 for grayscale (``L``), 3 for ``RGB``.
        size: Output height and width in pixels.
        max_pixels: Largest width x height decoded (default
            :data:`pipeline.options.DEFAULT_MAX_PIXELS`), checked from the header before decoding
            (for a drafted baseline JPEG, its size at the reduced DCT scale).
        resize: How a non-square image becomes square: ``center-crop``, ``pad`` or ``squash``
            (:data:`RESIZE_POLICIES`; the module docstring, step 5).

    Raises:
        ImageTooLargeError: Decoding would produce more than ``max_pixels`` pixels (the header's
            size, or a drafted JPEG's reduced size).
        ImageDecodeError: The bytes are empty, truncated, corrupt, not an image, or a
            decompression bomb.
        ConfigError: ``channels`` is not 1 or 3, ``size`` is not positive, or ``resize`` unknown.
    """
    return decode_with(data, channels, size, max_pixels, resize)


def decode_with(data: bytes, channels: int, size: int, max_pixels: int | None = None, resize: str = DEFAULT_RESIZE,
                draft_factor: int | None = DRAFT_FACTOR, reducing_gap: float | None = REDUCING_GAP) -> np.ndarray:
    """:func:`decode_image` with the fast path's knobs: ``draft_factor=None`` decodes a JPEG in
    full and ``reducing_gap=None`` resizes in one step (the exact path the tolerance is measured
    against: tests/test_photos.py, benchmarks/decode_speed.py)."""
    if max_pixels is None:
        max_pixels = DEFAULT_MAX_PIXELS
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    if size < 1:
        raise ConfigError(f"image size must be a positive number of pixels, got {size}")
    if resize not in RESIZE_POLICIES:
        raise ConfigError(f"--resize {resize}: choose one of {', '.join(RESIZE_POLICIES)}")
    if not data:
        raise ImageDecodeError("cannot decode image: empty data (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        scale = 1  # the DCT scaling: one decoded pixel is scale x scale pixels of the photo
        if img.format == "JPEG" and draft_factor:
            # Each axis keeps >= draft_factor x its resized size; the scaling is isotropic, so the
            # EXIF rotation applied after it does not change which axis that is.
            tw, th = _resized_dims(w, h, size, resize)
            if min(w / tw, h / th) >= 2 * draft_factor:
                drafted = img.draft(img.mode, (draft_factor * tw, draft_factor * th))
                scale = round(w / drafted[1][2]) if drafted else 1
        # What decoding holds in memory: a drafted baseline JPEG is 1/scale of the photo per axis; a
        # progressive one buffers every DCT coefficient at full size whatever the scale (measured: a
        # 48 Mpx photo drafted to 1/8 peaks at +5 MB baseline, +144 MB progressive).
        progressive = bool(img.info.get("progressive") or img.info.get("progression"))
        dw, dh = (w, h) if progressive else img.size
        if dw * dh > max_pixels:
            drafted_note = f"; decoded at 1/{scale} scale still {dw} x {dh} = {dw * dh}" if (dw, dh) != (w, h) else ""
            if progressive and scale > 1:
                drafted_note = " (a progressive JPEG holds all its coefficients at full size, however small the decode)"
            raise ImageTooLargeError(f"image is {w} x {h} = {w * h} pixels{drafted_note}, over the limit of "
                                     f"{max_pixels} (--max-pixels); raise --max-pixels to decode it")
        if img.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8):  # rotated by 90 degrees: the axes swap
            w, h = h, w
        img.load()
        if img.getexif().get(_ORIENTATION, 1) in (2, 3, 4, 5, 6, 7, 8):  # else upright: exif_transpose would copy
            img = ImageOps.exif_transpose(img)
    except ImageTooLargeError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own limit, hit inside Image.open
        raise ImageTooLargeError(f"cannot decode image ({len(data)} bytes): {exc}".split(", could be")[0]
                                 + " (a decompression bomb or a huge canvas)") from None
    except UnidentifiedImageError:
        if not HEIF_SUPPORTED and data[4:8] == b"ftyp" and data[8:12] in HEIF_BRANDS:
            raise ImageDecodeError(f"cannot decode image ({len(data)} bytes): HEIC/HEIF needs pillow-heif, "
                                   "which is not installed (pip install 'vaepipe[heif]')") from None
        raise ImageDecodeError(f"cannot decode image ({len(data)} bytes): not a recognised image format "
                               f"(starts with {data[:8].hex()})") from None
    except Exception as exc:  # Pillow's format plugins raise many exception types on bad data
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise ImageDecodeError(f"cannot decode image ({len(data)} bytes): {reason}") from None
    transform = _icc_transform(img)
    if transform is None:  # sRGB (or no usable profile): convert first, so the resize moves fewer bands
        img = _to_8bit(img, gray=channels == 1)
        mode = "L" if channels == 1 else "RGB"
        if img.mode != mode:  # convert() to the same mode would copy
            img = img.convert(mode)
    elif img.mode != "CMYK":  # RGB in the profile's space, alpha over white: transformed once resized
        img = _to_8bit(img).convert("RGB")
    img = _fit(img, (w, h), scale, size, resize, reducing_gap)
    if transform is not None:
        from PIL import ImageCms

        img = ImageCms.applyTransform(img, transform)
        if channels == 1:
            img = img.convert("L")
    if img.size != (size, size):  # --resize pad
        canvas = Image.new(img.mode, (size, size), PAD_VALUE if img.mode == "L" else (PAD_VALUE,) * 3)
        canvas.paste(img, ((size - img.size[0]) // 2, (size - img.size[1]) // 2))
        img = canvas
    arr = np.asarray(img, dtype=np.uint8)
    if channels == 1:
        return np.ascontiguousarray(arr[None])  # (1, H, W)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))  # (3, H, W)


def _resized_dims(w: int, h: int, size: int, resize: str) -> tuple[int, int]:
    """The whole image's size once resized for ``resize`` (before the crop or the padding)."""
    if resize == "squash":
        return size, size
    if resize == "pad":
        scale = size / max(w, h)
        return max(1, min(size, round(w * scale))), max(1, min(size, round(h * scale)))
    scale = size / min(w, h)
    return max(size, round(w * scale)), max(size, round(h * scale))


def _fit(img: Image.Image, full: tuple[int, int], scale: int, size: int, resize: str,
         reducing_gap: float | None) -> Image.Image:
    """Resize for ``resize``: a ``size`` square (center-crop, squash), or the content of the
    padded square (pad). ``img`` is the photo of size ``full`` decoded at 1/``scale``: the
    geometry (resized size, crop offsets) is that of the full photo whatever the scale, so that
    the fast path differs from a full decode by its filtering only, never by a pixel's shift.
    Center-crop resamples only the kept region (``box``), in the coordinates of resizing the
    whole image and cropping it."""
    w, h = full
    new_w, new_h = _resized_dims(w, h, size, resize)
    out, sx, sy = (new_w, new_h), w / new_w / scale, h / new_h / scale  # img pixels per resized pixel
    box: tuple[float, float, float, float] = (0, 0, w / scale, h / scale)
    if resize == "center-crop":
        left, top = (new_w - size) // 2, (new_h - size) // 2
        if scale == 1 and (new_w, new_h) == (w, h):
            return img if (w, h) == (size, size) else img.crop((left, top, left + size, top + size))
        box, out = (left * sx, top * sy, (left + size) * sx, (top + size) * sy), (size, size)
    elif scale == 1 and out == (w, h):
        return img
    return img.resize(out, Image.Resampling.BICUBIC, box=box, reducing_gap=reducing_gap)


@functools.lru_cache(maxsize=32)
def _profile_transform(profile: bytes, mode: str) -> object | None:
    """A littlecms transform from ``profile`` (an embedded ICC profile) to sRGB, or None when
    the profile is sRGB already or cannot be used (documented: module docstring, step 4)."""
    from PIL import ImageCms

    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        if "srgb" in ImageCms.getProfileDescription(src).lower().replace(" ", ""):
            return None
        return ImageCms.buildTransform(src, ImageCms.createProfile("sRGB"), mode, "RGB",
                                       renderingIntent=ImageCms.Intent.PERCEPTUAL)
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None


def _icc_transform(img: Image.Image) -> object | None:
    """The transform to sRGB of an RGB(A) or CMYK image's embedded profile; None if none is needed."""
    profile = img.info.get("icc_profile")
    if not profile or img.mode not in ("RGB", "RGBA", "RGBa", "RGBX", "CMYK"):
        return None
    return _profile_transform(bytes(profile), "CMYK" if img.mode == "CMYK" else "RGB")


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
