"""Calibration and validation data: ``--data`` parsed, checked against the model, and batched.

Accepted forms (first axis = samples everywhere):

* ``.npz`` -- one array per model input, keyed by input name, and optionally ``groups``, a
  label per sample: validation holds out whole groups (:mod:`onnxshrink.holdout`);
* ``.npy`` -- one array, for single-input models;
* a folder of images -- resized (shorter side to ``image_size / 0.875``), centre-cropped to
  ``image_size``, scaled to [0, 1], normalised with ``mean``/``std``, laid out NCHW or NHWC;
* ``random:N`` -- N seeded random samples (the report warns: random data makes data-driven
  passes weak);
* from the API also a ``dict`` of arrays or a single array.

A sample's array either has the input's rank (the sample axis stands for the batch axis, which
must then be dynamic or 1) or the input's rank + 1 (each sample is a whole input, batch
included). Dynamic dimensions are resolved from the data; with random data only a dynamic
batch can be resolved (to 1), anything else is refused with the dimension named.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxshrink import holdout as holdout_rules
from onnxshrink.errors import DataError, first_line
from onnxshrink.random_data import random_arrays

__all__ = ["InputSpec", "Dataset", "ImageOptions", "input_specs", "load_data"]

logger = logging.getLogger(__name__)

_MAX_BATCH = 16
MAX_RANDOM = 4096  # random:N samples at most
MAX_DATA_BYTES = 4 << 30  # arrays of a .npz, decompressed
GROUPS = "groups"  # the optional key of a label per sample (see onnxshrink.holdout)


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """A graph input as the data sees it: dims are ints or None (dynamic, with its name)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | None, ...]
    dim_names: tuple[str | None, ...]

    def describe(self) -> str:
        dims = [str(d) if d is not None else (n or "?") for d, n in zip(self.dims, self.dim_names)]
        return f"{self.name}: {self.dtype} [{', '.join(dims)}]"


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The model's real inputs (initializers listed as inputs excluded)."""
    specs = []
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        if value.dtype is None or value.shape is None:
            raise DataError(f"input '{value.name}' has no type or shape in the model")
        dims, names = [], []
        for d in value.shape:
            if isinstance(d, int) and d > 0:  # Paddle exports write a dynamic axis as -1
                dims.append(d)
                names.append(None)
            else:
                dims.append(None)
                names.append(getattr(d, "value", None))
        specs.append(
            InputSpec(value.name, np.dtype(value.dtype.numpy()), tuple(dims), tuple(names))
        )
    return specs


@dataclasses.dataclass
class ImageOptions:
    """How a folder of images becomes model input."""

    image_size: int | None = None
    mean: tuple[float, ...] | str | None = None  # None: 0 for every channel
    std: tuple[float, ...] | str | None = None  # None: 1 for every channel
    layout: str | None = None  # "NCHW" | "NHWC"; None: from the input shape


@dataclasses.dataclass
class Dataset:
    """Samples for every model input; ``arrays[name]`` has the samples on axis 0.

    ``per_sample_batch`` is True when each sample is a whole input (rank + 1 arrays).
    """

    arrays: dict[str, np.ndarray]
    specs: list[InputSpec]
    source: str
    is_random: bool = False
    per_sample_batch: bool = False
    notes: list[str] = dataclasses.field(default_factory=list)  # conversions made, for the report
    groups: np.ndarray | None = None  # a label per sample: validation takes whole groups

    @property
    def n_samples(self) -> int:
        return len(next(iter(self.arrays.values())))

    def batch_size(self) -> int:
        """Samples per run: 1 for a fixed batch axis, up to 16 for a dynamic one."""
        if self.per_sample_batch:
            return 1
        if any(s.dims and s.dims[0] is not None for s in self.specs):
            return 1
        return _MAX_BATCH

    def batches(self, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Feeds for onnxruntime, in order, covering the first ``limit`` samples."""
        n = self.n_samples if limit is None else min(limit, self.n_samples)
        step = self.batch_size()
        for start in range(0, n, step):
            stop = min(start + step, n)
            if self.per_sample_batch:
                yield {k: np.asarray(v[start]) for k, v in self.arrays.items()}  # rank 0 too
            else:
                yield {k: v[start:stop] for k, v in self.arrays.items()}

    def subset(self, indices: np.ndarray | list[int] | slice, source: str | None = None) -> Dataset:
        idx = indices if isinstance(indices, slice) else np.asarray(indices)
        return dataclasses.replace(
            self,
            arrays={k: v[idx] for k, v in self.arrays.items()},
            source=source or self.source,
            groups=None if self.groups is None else self.groups[idx],
        )

    def split(self, holdout: float) -> tuple[Dataset, Dataset]:
        """(calibration, validation): the last ``holdout`` share of the samples is held out,
        whole groups when the data names them (:func:`onnxshrink.holdout.tail`).

        The tail, not a random draw: data files are often grouped (by photo, by speaker), and a
        contiguous hold-out then measures fidelity on inputs unlike those a pass fitted to.
        """
        held = holdout_rules.tail(self.n_samples, holdout, self.groups)
        k, n = int(held.sum()), self.n_samples
        return (
            self.subset(np.flatnonzero(~held), f"{self.source} [first {n - k}]"),
            self.subset(np.flatnonzero(held), f"{self.source} [last {k}]"),
        )

    def spread(self, holdout: float) -> tuple[Dataset, int]:
        """(the samples with a ``holdout`` share of them moved to the end, how many): every
        k-th sample, spread over them all, so that every group of a grouped file has some held
        out -- for early stopping, where :meth:`split`'s tail would stand for one group alone
        (:func:`onnxshrink.holdout.spread`)."""
        held = holdout_rules.spread(self.n_samples, holdout)
        return self.subset(np.concatenate([np.flatnonzero(~held), np.flatnonzero(held)])), int(
            held.sum()
        )

    def n_groups(self) -> int | None:
        """How many groups the data names (None: samples are not grouped)."""
        return None if self.groups is None else len(np.unique(self.groups))

    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        """The concrete shape each input has when fed one batch of one sample."""
        shapes = {}
        for spec in self.specs:
            arr = self.arrays[spec.name]
            shapes[spec.name] = (
                tuple(arr.shape[1:]) if self.per_sample_batch else (1, *arr.shape[1:])
            )
        return shapes


def _parse_floats(text: str | tuple[float, ...] | list[float], what: str) -> tuple[float, ...]:
    if isinstance(text, (tuple, list)):
        return tuple(float(x) for x in text)
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError as e:
        raise DataError(f"--{what}: expected comma-separated numbers, got '{text}'") from e


def load_data(
    spec: str | os.PathLike | Mapping[str, np.ndarray] | np.ndarray | Dataset | None,
    specs: list[InputSpec],
    *,
    images: ImageOptions | None = None,
    default_random: int = 8,
) -> Dataset:
    """Reads ``spec`` and checks it against the model inputs ``specs``.

    ``None`` gives ``random:<default_random>``.
    """
    if isinstance(spec, Dataset):
        return spec
    if spec is None:
        spec = f"random:{default_random}"
    if isinstance(spec, np.ndarray):
        if len(specs) != 1:
            raise DataError(f"a single array was given but the model has {len(specs)} inputs")
        return _check(dict({specs[0].name: spec}), specs, "array")
    if isinstance(spec, Mapping):
        return _grouped(dict(spec), specs, "arrays")
    text = os.fspath(spec)
    if m := re.fullmatch(r"random(?::(\d+))?", text):
        n = int(m.group(1) or default_random)
        if n > MAX_RANDOM:
            raise DataError(
                f"--data random:{n}: at most random:{MAX_RANDOM} (calibration uses a few "
                "hundred samples, validation 64)"
            )
        return Dataset(random_arrays(specs, n), specs, f"random:{n}", is_random=True)
    path = Path(text)
    if not path.exists():
        raise DataError(
            f"--data {text}: no such file or folder (expected .npz, .npy, an image "
            "folder or random:N)"
        )
    if path.is_dir():
        from onnxshrink.images import read_folder

        arrays, notes = read_folder(path, specs, images or ImageOptions())
        found = _check(arrays, specs, str(path))
        found.notes[:0] = notes
        return found
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                _check_headers(z, specs, str(path))
                arrays = {k: z[k] for k in z.files}
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"--data {path}: cannot read .npz: {first_line(e, 200)}") from e
        return _grouped(arrays, specs, str(path))
    if path.suffix == ".npy":
        if len(specs) != 1:
            raise DataError(
                f"--data {path}: a .npy holds one array but the model has {len(specs)} inputs "
                f"({', '.join(s.name for s in specs)}); use a .npz keyed by input name"
            )
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as e:
            raise DataError(f"--data {path}: cannot read .npy: {first_line(e, 200)}") from e
        return _check({specs[0].name: arr}, specs, str(path))
    raise DataError(
        f"--data {path}: unknown format (expected .npz, .npy, an image folder or random:N)"
    )


def _check_headers(z, specs: list[InputSpec], source: str) -> None:
    """Shapes and sizes of a .npz's arrays from their headers, before anything is decompressed
    (a few MB of zeros can hold many GB)."""
    by_name = {s.name: s for s in specs}
    total = 0
    for key in z.files:
        with z.zip.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read(f)
        if key in by_name:
            _layout(tuple(shape), by_name[key], source)
        total += int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    if total > MAX_DATA_BYTES:
        raise DataError(
            f"--data {source}: {total / 2**30:.1f} GiB of arrays (at most {MAX_DATA_BYTES >> 30} "
            "GiB; "
            "calibration uses a few hundred samples)"
        )


def _grouped(arrays: dict[str, np.ndarray], specs: list[InputSpec], source: str) -> Dataset:
    """:func:`_check`, with the optional ``groups`` array (one label per sample, an integer or a
    string; unless the model has an input of that name) taken out first and checked."""
    if GROUPS not in arrays or any(s.name == GROUPS for s in specs):
        return _check(arrays, specs, source)
    groups = np.asarray(arrays.pop(GROUPS))
    found = _check(arrays, specs, source)
    if groups.ndim != 1 or len(groups) != found.n_samples or groups.dtype.kind not in "iubUS":
        raise DataError(
            f"--data {source}: '{GROUPS}' must be one integer or string label per sample "
            f"({found.n_samples}), got {groups.dtype} of shape {list(groups.shape)}"
        )
    found.groups = groups
    n = found.n_groups()
    found.notes.append(
        f"--data {source}: {n} groups; validation holds out whole groups"
        if n > 1
        else f"--data {source}: one group only; validation holds out single samples"
    )
    return found


def _check(arrays: dict[str, np.ndarray], specs: list[InputSpec], source: str) -> Dataset:
    names = {s.name for s in specs}
    missing = [s.name for s in specs if s.name not in arrays]
    extra = [k for k in arrays if k not in names]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing input(s) {', '.join(missing)}")
        if extra:
            parts.append(f"unknown key(s) {', '.join(extra)}")
        raise DataError(
            f"--data {source}: {'; '.join(parts)}; the model's inputs are "
            + "; ".join(s.describe() for s in specs)
        )
    counts = set()
    per_sample = None
    out, notes = {}, []
    for s in specs:
        arr = np.asarray(arrays[s.name])
        if arr.dtype != s.dtype:
            notes.append(
                f"--data {source}: input '{s.name}' given as {arr.dtype}, converted to {s.dtype}"
            )
        arr, mode = _fit(arr, s, source)
        if per_sample is not None and mode != per_sample:
            raise DataError(f"--data {source}: inputs disagree on whether axis 0 is the batch")
        per_sample = mode
        counts.add(arr.shape[0])
        out[s.name] = arr
    if len(counts) != 1:
        raise DataError(f"--data {source}: inputs have different sample counts {sorted(counts)}")
    if counts.pop() == 0:
        raise DataError(f"--data {source}: zero samples")
    return Dataset(out, specs, source, per_sample_batch=bool(per_sample), notes=notes)


def _layout(shape: tuple[int, ...], s: InputSpec, source: str) -> bool:
    """Whether samples of ``shape`` are whole inputs (rank + 1) or batch rows (rank); raises
    :class:`DataError` when the shape does not fit the input."""
    rank = len(s.dims)
    want = s.describe()
    if len(shape) == rank:
        per_sample, dims = False, s.dims[1:]
        got = shape[1:]
        if rank == 0:
            raise DataError(f"--data {source}: input '{s.name}' is a scalar; give rank-1 samples")
        if s.dims[0] not in (None, 1):
            raise DataError(
                f"--data {source}: input '{s.name}' has a fixed batch of {s.dims[0]}; give "
                f"samples of shape {list(s.dims)} stacked on a new first axis"
            )
    elif len(shape) == rank + 1:
        per_sample, dims, got = True, s.dims, shape[1:]
    else:
        raise DataError(
            f"--data {source}: input '{s.name}' got shape {list(shape)}, expected samples "
            f"for {want} (samples on axis 0)"
        )
    for axis, (d, g) in enumerate(zip(dims, got)):
        if d is not None and d != g:
            raise DataError(
                f"--data {source}: input '{s.name}' got shape {list(shape)}, expected "
                f"samples for {want}"
            )
    return per_sample


def _fit(arr: np.ndarray, s: InputSpec, source: str) -> tuple[np.ndarray, bool]:
    per_sample = _layout(arr.shape, s, source)
    if arr.dtype != s.dtype:
        same_kind = (
            np.issubdtype(arr.dtype, np.floating) and np.issubdtype(s.dtype, np.floating)
        ) or (np.issubdtype(arr.dtype, np.integer) and np.issubdtype(s.dtype, np.integer))
        if not same_kind:
            raise DataError(
                f"--data {source}: input '{s.name}' got dtype {arr.dtype}, the model wants "
                f"{s.dtype}"
            )
        if np.issubdtype(s.dtype, np.integer):
            info = np.iinfo(s.dtype)
            if arr.size and (arr.min() < info.min or arr.max() > info.max):
                raise DataError(f"--data {source}: input '{s.name}' holds values outside {s.dtype}")
        arr = arr.astype(s.dtype)  # a float beyond the input's range becomes Inf: refused below
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        bad = int(np.size(arr) - np.isfinite(arr).sum())
        raise DataError(f"--data {source}: input '{s.name}' holds {bad} NaN/Inf values")
    return np.ascontiguousarray(arr), per_sample
