"""Real photos for calibration and evaluation of ImageNet models, with no download.

17 distinct photos ship with scikit-learn (``load_sample_images``: china, flower) and
scikit-image (``skimage.data``: astronaut, chelsea the cat, coffee, rocket, motorcycle, Hubble
deep field, retina, immunohistochemistry, and grayscale camera, coins, moon, clock, grass,
gravel, brick -- grayscale ones replicated to RGB). Each photo gives several 224×224 crops: the
shorter side is resized to 224, 256, 320 and 400 pixels, and at each scale the centre and the
four corners are cropped (20 crops per photo), then normalised with ImageNet's mean and std,
NCHW float32.

The split is **by photo**: no photo has crops in both parts. Each file's ``groups`` names the
photo of every crop, so ``compress``'s own validation also holds out whole photos.

* calibration: china, astronaut, coffee, motorcycle, hubble, camera, coins, grass   (160 crops)
* evaluation:  flower, chelsea, rocket, retina, ihc, moon, clock, gravel, brick     (180 crops)

    python models/photos.py            # writes photos_calib.npz / photos_eval.npz into the cache
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.common import cache_dir  # noqa: E402

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
CALIBRATION = ("china", "astronaut", "coffee", "motorcycle", "hubble", "camera", "coins", "grass")
EVALUATION = ("flower", "chelsea", "rocket", "retina", "ihc", "moon", "clock", "gravel", "brick")
SCALES = (224, 256, 320, 400)


def photos() -> dict[str, np.ndarray]:
    """name -> uint8 RGB image [H, W, 3]."""
    import skimage.data as d
    from sklearn.datasets import load_sample_images

    sk = load_sample_images()
    named = dict(zip(("china", "flower"), sk.images))
    named.update(
        astronaut=d.astronaut(),
        chelsea=d.chelsea(),
        coffee=d.coffee(),
        rocket=d.rocket(),
        motorcycle=d.stereo_motorcycle()[0],
        hubble=d.hubble_deep_field(),
        retina=d.retina(),
        ihc=d.immunohistochemistry(),
        camera=d.camera(),
        coins=d.coins(),
        moon=d.moon(),
        clock=d.clock(),
        grass=d.grass(),
        gravel=d.gravel(),
        brick=d.brick(),
    )
    out = {}
    for name, img in named.items():
        img = np.asarray(img)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        out[name] = img[..., :3].astype(np.uint8)
    return out


def crops(img: np.ndarray, size: int = 224) -> list[np.ndarray]:
    from PIL import Image

    pil = Image.fromarray(img)
    out = []
    for short in SCALES:
        w, h = pil.size
        s = short / min(w, h)
        im = pil.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
        a = np.asarray(im)
        H, W = a.shape[:2]
        for top, left in (
            ((H - size) // 2, (W - size) // 2),
            (0, 0),
            (0, W - size),
            (H - size, 0),
            (H - size, W - size),
        ):
            out.append(a[top : top + size, left : left + size])
    return out


def normalise(batch: np.ndarray) -> np.ndarray:
    x = (batch.astype(np.float32) / 255.0 - MEAN) / STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _has_groups(path: Path) -> bool:
    """Whether ``path`` exists and names each crop's photo (files of before 2026-12-07 do not)."""
    if not path.exists():
        return False
    with np.load(path) as z:
        return "groups" in z.files


def build(force: bool = False) -> dict[str, Path]:
    """Builds (once) ``photos_calib.npz`` and ``photos_eval.npz``: key ``input``, and ``groups``,
    each crop's photo, so that ``compress`` validates on whole photos."""
    out = cache_dir() / "photos"
    out.mkdir(exist_ok=True)
    paths = {"calib": out / "photos_calib.npz", "eval": out / "photos_eval.npz"}
    if not force and all(_has_groups(p) for p in paths.values()):
        return paths
    imgs = photos()
    assert not set(CALIBRATION) & set(EVALUATION)
    for key, names in (("calib", CALIBRATION), ("eval", EVALUATION)):
        batch = np.stack([c for n in names for c in crops(imgs[n])])
        groups = np.repeat(np.array(names), len(batch) // len(names))  # the photo of each crop
        tmp = paths[key].with_suffix(".tmp.npz")
        np.savez_compressed(tmp, input=normalise(batch), groups=groups)
        tmp.replace(paths[key])
    return paths


if __name__ == "__main__":
    for kind, path in build(force="--force" in sys.argv).items():
        with np.load(path) as z:
            print(f"{kind}: {path} {z['input'].shape}")
