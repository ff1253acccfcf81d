"""Regenerate the photo slice in this folder from mvtb-data's photographs (deterministic).

    .venv/bin/python tests/data/photos/make_photos.py

Each file is a resized or cropped copy of one mvtb-data photo (MIT; LICENSE.md names them),
chosen to cover what a photo folder holds: JPEG at several qualities, progressive, an EXIF
orientation that must be applied, CMYK (Adobe inverted, as Pillow and Photoshop write it), an
embedded Adobe RGB profile, PNG with alpha and without, WebP lossy and lossless; landscape and
portrait, 90 x 60 to 480 x 320.
"""
from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
LANCZOS = Image.Resampling.LANCZOS


def _source(name: str) -> Image.Image:
    import mvtbdata

    return Image.open(Path(mvtbdata.__file__).parent / "images" / name)


def _fit(img: Image.Image, size: tuple[int, int], box: tuple[int, int, int, int] | None = None) -> Image.Image:
    return img.convert("RGB").resize(size, LANCZOS, box=box)


def _exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def build() -> dict[str, bytes]:
    """File name -> bytes of every photo of the slice."""
    out: dict[str, bytes] = {}

    def save(name: str, img: Image.Image, fmt: str, **kw: object) -> None:
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        out[name] = buf.getvalue()

    save("butterfly-q60.jpg", _fit(_source("butterfly.jpg"), (200, 144)), "JPEG", quality=60)
    save("church-portrait-q95.jpg", _fit(_source("church.png"), (160, 240), box=(400, 0, 966, 851)), "JPEG", quality=95)
    save("parks-progressive-q85.jpg", _fit(_source("parks.png"), (480, 320), box=(0, 200, 3264, 2376)), "JPEG",
         quality=85, progressive=True)
    save("notre-dame-tiny-q75.jpg", _fit(_source("notre-dame.png"), (90, 60)), "JPEG", quality=75)
    # stored landscape, shown portrait: EXIF orientation 6 = rotate 90 degrees clockwise to view
    portrait = _fit(_source("roof.png"), (200, 300), box=(400, 0, 1512, 1668))
    save("roof-exif6-q90.jpg", portrait.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=90,
         exif=_exif_orientation(6))
    save("greenscreen-cmyk-q90.jpg", _fit(_source("greenscreen.png"), (180, 135)).convert("CMYK"), "JPEG", quality=90)
    image3 = _source("image3.jpg")  # carries an Adobe RGB (1998) profile: kept
    save("image3-adobergb-q90.jpg", _fit(image3, (320, 219)), "JPEG", quality=90,
         icc_profile=image3.info["icc_profile"])
    road = _fit(_source("road.png"), (240, 160))
    alpha = Image.linear_gradient("L").transpose(Image.Transpose.ROTATE_90).resize((240, 160))
    road.putalpha(alpha)  # transparent on one side, opaque on the other
    save("road-rgba.png", road, "PNG", optimize=True)
    save("tomato.png", _fit(_source("tomato_14.png"), (159, 119)), "PNG", optimize=True)
    save("eiffel-portrait-lossy.webp", _fit(_source("eiffel-1.png"), (120, 180), box=(300, 0, 867, 851)), "WEBP",
         quality=80, method=4)
    save("lab-lossless.webp", _fit(_source("lab-scene.png"), (150, 100)), "WEBP", lossless=True, method=4)
    save("flowers-q90.jpg", _fit(_source("flowers4.png"), (360, 240)), "JPEG", quality=90)
    return out


def main() -> None:
    files = build()
    for name, data in files.items():
        (HERE / name).write_bytes(data)
    print(f"wrote {len(files)} photos, {sum(map(len, files.values())) / 1e3:.0f} KB")


if __name__ == "__main__":
    main()
