"""A folder of images as samples for an image model's input (``--data FOLDER``).

Each image: converted to RGB (or L for one channel), resized so its short side is size / 0.875,
center-cropped to size x size (the usual ImageNet evaluation crop), scaled to 0..1, normalised by
``--mean`` / ``--std``, laid out NCHW or NHWC as the input is. Only regular files with an image
suffix are read (a FIFO named ``a.png`` would block forever), in name order, and at most
:data:`MAX_IMAGES` of them -- evenly spaced through the folder when it holds more, so a folder
of 50,000 photos costs what 1,024 do (calibration uses a few hundred samples, validation 64).
Pillow's decompression-bomb warning (an image over 89 M pixels) is not shown: such an image is
read and shrunk like any other; beyond twice that Pillow refuses it, and so does this reader.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from onnxshrink.errors import DataError, first_line

__all__ = ["MAX_IMAGES", "read_folder"]

MAX_IMAGES = 1024
SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


def read_folder(folder: Path, specs, opts) -> tuple[dict[str, np.ndarray], list[str]]:
    """({input name: samples}, notes for the report) from the images in ``folder``."""
    from PIL import Image  # imported here: only image folders need it

    if len(specs) != 1:
        raise DataError(f"--data {folder}: an image folder feeds single-input models only")
    s = specs[0]
    if len(s.dims) != 4:
        raise DataError(f"--data {folder}: input '{s.name}' is not an image batch (rank 4)")
    layout = opts.layout or ("NHWC" if s.dims[3] in (1, 3) and s.dims[1] not in (1, 3) else "NCHW")
    if layout not in ("NCHW", "NHWC"):
        raise DataError(f"--layout must be NCHW or NHWC, got '{layout}'")
    c_axis, hw = (1, (2, 3)) if layout == "NCHW" else (3, (1, 2))
    channels = s.dims[c_axis] or 3
    size = opts.image_size or s.dims[hw[0]]
    if size is None:
        raise DataError(f"--data {folder}: input '{s.name}' has dynamic height; give --image-size")
    mean, std = (
        _per_channel(given, what, default, channels, s.name)
        for given, what, default in ((opts.mean, "mean", 0.0), (opts.std, "std", 1.0))
    )
    if (std == 0).any():
        raise DataError(f"--std: {','.join(f'{v:g}' for v in std)} has a zero; std divides")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES and p.is_file())
    if not files:
        raise DataError(
            f"--data {folder}: no images in the folder (looked for {', '.join(sorted(SUFFIXES))})"
        )
    notes = []
    if len(files) > MAX_IMAGES:
        notes.append(
            f"--data {folder}: {MAX_IMAGES} of its {len(files)} images used, evenly spaced"
        )
        files = [files[i] for i in np.linspace(0, len(files) - 1, MAX_IMAGES).round().astype(int)]
    x = np.empty((len(files), size, size, channels), np.float32)
    for i, f in enumerate(files):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(f) as im:
                    crop = _center_crop(im.convert("L" if channels == 1 else "RGB"), size)
        except Exception as e:
            raise DataError(
                f"--data {folder}: cannot read image {f.name}: {first_line(e, 200)}"
            ) from e
        x[i] = crop.reshape(size, size, -1) / np.float32(255.0)
    x = (x - mean) / std
    if layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    return {s.name: np.ascontiguousarray(x.astype(s.dtype, copy=False))}, notes


def _per_channel(given, what: str, default: float, channels: int, name: str) -> np.ndarray:
    """``--mean``/``--std`` as one value per channel: none given -> ``default`` for each; one
    value -> the same for each; else exactly one per channel of the input."""
    from onnxshrink.data import _parse_floats

    if given is None:
        return np.full(channels, default, np.float32)
    values = np.asarray(_parse_floats(given, what), np.float32)
    if len(values) not in (1, channels):
        raise DataError(
            f"--{what}: {len(values)} values for input '{name}', which has {channels} "
            f"channel{'s' if channels > 1 else ''}; give 1 or {channels}"
        )
    return values


def _center_crop(im, size: int) -> np.ndarray:
    from PIL import Image

    short = round(size / 0.875)
    w, h = im.size
    scale = short / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))
