"""The pass base class, its context, and option parsing from ``NAME:key=value,...`` specs.

A pass is a dataclass whose fields are its options (the CLI reads names, types and defaults from
there). It rewrites the model in place through the IR and records, for the report, what it
changed (:meth:`ShrinkPass.change`) and what it refused and why (:meth:`ShrinkPass.skip`). It
never validates itself: the pipeline's instruments do that around it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import tempfile
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import onnx_ir as ir

from onnxshrink.errors import OptionError
from onnxshrink.report import Skip

__all__ = ["DISCARD", "Log", "PassContext", "ShrinkPass", "NullTask", "parse_spec", "option_fields"]

logger = logging.getLogger(__name__)


class Log(Protocol):
    """Where a pass's code records changes and refusals: the pass itself (a :class:`ShrinkPass`)
    on the real model, :data:`DISCARD` on a trial copy, so nothing a trial does reaches the
    report."""

    def change(self, what: str, layer: str | None = None) -> None: ...

    def skip(self, node: ir.Node | str, reason: str) -> None: ...


class _Discard:
    """A log that keeps nothing: for trial copies."""

    def change(self, what: str, layer: str | None = None) -> None: ...

    def skip(self, node: ir.Node | str, reason: str) -> None: ...


DISCARD = _Discard()


@dataclasses.dataclass
class PassContext:
    """What the pipeline hands a pass: calibration data, a scratch folder, the original model."""

    data: Any = None  # onnxshrink.data.Dataset | None
    workdir: Path | None = None
    original: ir.Model | None = None
    progress: Any = None  # callable(description, total) -> advance(n) callback, or None
    memo: Any = None  # onnxshrink.memo.Memo: per-layer results kept for a pass's re-runs


@dataclasses.dataclass
class ShrinkPass(ir.passes.InPlacePass):
    """Base of all onnxshrink passes. Subclasses set ``name`` and implement ``call``."""

    name: ClassVar[str] = ""
    lossy: ClassVar[bool] = False
    needs_data: ClassVar[bool] = False  # True: data-driven (the report warns on random data)
    subgraphs: ClassVar[bool] = False  # True: rewrites inside If/Loop/Scan bodies too
    # what a lossy pass's fidelity floor is measured against: "original" or "before" (the pass);
    # "improve": no floor, but the cosine with the original must not fall (distill)
    compare_to: ClassVar[str] = "original"
    one_of: ClassVar[tuple[str, ...]] = ()  # options of which at most one may be set

    def __post_init__(self) -> None:
        from onnxshrink.passes import options

        options.check(self)
        self.context = PassContext()
        self.changed: list[str] = []
        self.skipped: list[Skip] = []
        self.details: dict[str, Any] = {}
        self.layers: list[str] = []  # what ``skip`` names, of the layers this run compressed

    # -- for subclasses ---------------------------------------------------------------------
    def skip(self, node: ir.Node | str, reason: str) -> None:
        """Records that ``node`` was left unchanged, and why (goes into the report)."""
        name = node if isinstance(node, str) else (node.name or node.op_type)
        self.skipped.append(Skip(name, reason))
        logger.debug("%s: skipped %s: %s", self.name, name, reason)

    def task(self, description: str, total: int):
        """A progress sub-task for long work: call it with the amount done, ``.done()`` at the end
        (a no-op when the pipeline shows no progress)."""
        progress = self.context.progress
        return NullTask() if progress is None else progress.task(description, total)

    def change(self, what: str, layer: str | None = None) -> None:
        """Records one change (e.g. ``"Conv_3 <- BatchNormalization_4"``); ``layer``: the name
        the ``skip`` option would give to leave this change out (a lossy pass below its floor
        is re-run sparing the most damaging of these: :mod:`onnxshrink.degrade`)."""
        self.changed.append(what)
        if layer:
            self.layers.append(layer)

    @property
    def has_real_data(self) -> bool:
        """Calibration data given by the user (not absent, not ``random:N``)."""
        data = self.context.data
        return data is not None and not getattr(data, "is_random", True)

    def fold_batchnorm(self, model: ir.Model) -> tuple[bool, dict[str, str]]:
        """Folds every BatchNormalization that can be into its Conv/ConvTranspose/Gemm (exact,
        as the ``fold-batchnorm`` pass), for a pass whose patterns need BN folded; the folds are
        recorded as this pass's changes (``details["batchnorm_folded"]``). Returns whether any
        was folded, and why each other BN (by node name) was not."""
        from onnxshrink.passes.fold_batchnorm import FoldBatchNormPass

        fold = FoldBatchNormPass()
        fold.bind(self.context)
        modified = fold.call(model).modified
        for what in fold.changed:
            self.change(what)
        if modified:
            self.details["batchnorm_folded"] = len(fold.changed)
        return modified, {s.node: s.reason for s in fold.skipped}

    @contextlib.contextmanager
    def scratch(self) -> Iterator[Path]:
        """The pipeline's scratch folder, or (a pass run alone) a temporary one removed after."""
        if self.context.workdir is not None:
            yield self.context.workdir
            return
        path = Path(tempfile.mkdtemp(prefix=f"onnxshrink-{self.name}-"))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def refit_nodes(self, model, teacher, nodes, data, workdir: Path, removed=None) -> list[dict]:
        """Least-squares re-fit of ``nodes`` to ``teacher``'s outputs (the pass's ``samples`` and
        ``ridge``; :func:`onnxshrink.analysis.refit.refit_layers`); the layers it cannot re-fit
        are skipped with the reason. One record per re-fitted layer."""
        from onnxshrink.analysis.refit import refit_layers, refit_supported

        todo = []
        for n in nodes:
            if reason := refit_supported(n):
                self.skip(n, f"not re-fitted: {reason}")
            else:
                todo.append(n)
        if not todo:
            return []
        task = self.task(f"{self.name}: re-fit", len({n.inputs[0].name for n in todo}))
        try:
            return refit_layers(
                model,
                teacher,
                todo,
                removed or {},
                data,
                workdir,
                samples=self.samples,
                ridge=self.ridge,
                progress=task,
            )
        finally:
            task.done()

    # -- for the pipeline -------------------------------------------------------------------
    def __call__(self, model: ir.Model) -> ir.passes.PassResult:
        """Runs the pass with one name scope (:func:`onnxshrink.irtools.names`): each graph's
        names are gathered once per pass, not once per new name."""
        from onnxshrink.irtools import names

        with names():
            result = super().__call__(model)
        if (
            self.lossy
            and not self.subgraphs
            and not result.modified
            and (inside := _weighted_in_subgraphs(model))
        ):
            self.skip(
                "model",
                f"{inside} Conv/Gemm/MatMul inside If/Loop/Scan bodies: this pass rewrites the "
                "main graph only",
            )
        return result

    def bind(self, context: PassContext) -> None:
        self.context = context
        self.changed, self.skipped, self.details, self.layers = [], [], {}, []

    def options(self) -> dict[str, Any]:
        """The option values that differ from the defaults (for the report)."""
        out = {}
        for f in option_fields(type(self)):
            value = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else None
            if value != default:
                out[f.name.rstrip("_").replace("_", "-")] = (
                    list(value) if isinstance(value, tuple) else value
                )
        return out

    def spec(self) -> str:
        """``NAME:key=value,...`` with the options that differ from the defaults (lists joined
        by ``+``); :func:`onnxshrink.passes.make_pass` reads it back to an equal pass."""
        options = ",".join(f"{k}={_spec_value(v)}" for k, v in self.options().items())
        return f"{self.name}:{options}" if options else self.name

    @classmethod
    def describe(cls) -> str:
        """The docstring's first paragraph, on one line (a first line alone may stop
        mid-sentence)."""
        return " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())

    @classmethod
    def from_options(cls, options: dict[str, str]) -> ShrinkPass:
        """Builds the pass from string options, converting each by its field's type."""
        fields = {f.name: f for f in option_fields(cls)}
        kwargs = {}
        from onnxshrink.passes.options import ALIASES

        for key, raw in options.items():
            fname = ALIASES.get(key, key).replace("-", "_")
            if fname not in fields and fname + "_" in fields:  # python keywords: global -> global_
                fname += "_"
            if fname not in fields:
                known = ", ".join(f.rstrip("_").replace("_", "-") for f in fields) or "none"
                raise OptionError(f"pass '{cls.name}' has no option '{key}' (options: {known})")
            kwargs[fname] = _convert(raw, fields[fname], cls)
        try:
            return cls(**kwargs)
        except OptionError:
            raise
        except (TypeError, ValueError) as e:
            raise OptionError(f"pass '{cls.name}': {e}") from e


class NullTask:
    """A progress task that shows nothing."""

    def __call__(self, n: int = 1) -> None: ...

    def done(self) -> None: ...


def _spec_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "+".join(map(_spec_value, value))
    if isinstance(value, bool):
        return str(value).lower()
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def option_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _resolved_type(field: dataclasses.Field, cls: type) -> Any:
    hints = typing.get_type_hints(cls)
    return hints.get(field.name, str)


def _convert(raw: str | list[str], field: dataclasses.Field, cls: type) -> Any:
    tp = _resolved_type(field, cls)
    key = field.name.replace("_", "-")
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if isinstance(raw, str) and raw.lower() in ("none", "") and len(non_none) < len(args):
            return None
        last: Exception | None = None
        for a in non_none:
            try:
                return _convert_to(raw, a, key, cls)
            except OptionError as e:
                last = e
        raise last or OptionError(f"pass '{cls.name}': bad value for {key}")
    return _convert_to(raw, tp, key, cls)


def _convert_to(raw: str | list[str], tp: Any, key: str, cls: type) -> Any:
    origin = typing.get_origin(tp)
    if origin is tuple:
        items = raw if isinstance(raw, list) else [x for x in raw.split("+") if x]
        (item_tp, *_) = typing.get_args(tp) or (str,)
        return tuple(_convert_to(x, item_tp, key, cls) for x in items)
    if isinstance(raw, list):
        raise OptionError(f"pass '{cls.name}': option {key} takes one value, got {','.join(raw)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if raw not in choices:
            raise OptionError(
                f"pass '{cls.name}': {key} must be one of {', '.join(map(str, choices))}; got "
                f"'{raw}'"
            )
        return raw
    try:
        if tp is bool:
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if tp is int:
            return int(raw)
        if tp is float:
            return float(raw)
        if tp is str:
            return raw
    except ValueError as e:
        raise OptionError(
            f"pass '{cls.name}': {key} expects {getattr(tp, '__name__', tp)}, got '{raw}'"
        ) from e
    raise OptionError(f"pass '{cls.name}': option {key} cannot be set from the command line")


def parse_spec(spec: str) -> tuple[str, dict[str, str | list[str]]]:
    """``"prune:ratio=0.3,skip=a,b"`` -> ``("prune", {"ratio": "0.3", "skip": ["a", "b"]})``.

    A comma-separated item without ``=`` continues the previous option's value as a list, so
    node lists need no quoting: ``skip=conv1,conv2,ratio=0.2``.
    """
    name, _, rest = spec.strip().partition(":")
    if not name:
        raise OptionError(f"bad pass spec '{spec}': expected NAME[:KEY=VALUE[,KEY=VALUE]...]")
    options: dict[str, str | list[str]] = {}
    last = None
    for item in filter(None, (x.strip() for x in rest.split(","))):
        if "=" in item:
            key, _, value = item.partition("=")
            key = key.strip()
            if not key:
                raise OptionError(f"bad pass spec '{spec}': empty option name")
            options[key] = value.strip()
            last = key
        elif last is not None:
            prev = options[last]
            options[last] = [*(prev if isinstance(prev, list) else [prev]), item]
        else:
            raise OptionError(f"bad pass spec '{spec}': expected KEY=VALUE, got '{item}'")
    return name, options


def _weighted_in_subgraphs(model: ir.Model) -> int:
    """Conv / ConvTranspose / Gemm / MatMul nodes in the model's subgraphs (not the main graph)."""
    ops = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
    every = sum(n.op_type in ops for n in ir.traversal.RecursiveGraphIterator(model.graph))
    return every - sum(n.op_type in ops for n in model.graph)
