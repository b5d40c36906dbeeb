"""Loading and writing models: the only place (with validation) where protobuf meets the IR.

* :func:`load` takes a path, an ``onnx.ModelProto`` or an ``ir.Model`` and returns a private
  ``ir.Model`` (the caller's object is never touched). A file is checked on the way in: empty,
  not protobuf, truncated or failing ``onnx.checker`` gives a one-line :class:`ModelError`.
  External data is not read: tensors stay memory-mapped until a pass needs them.
* Weights held in ``Constant`` nodes (Paddle and some TF exports store every weight that way)
  become initializers, so passes that look for constant weights find them.
* :func:`write` writes a model to a path, choosing external data by size; atomic writes of
  what a user gets are :mod:`onnxshrink.atomic`'s.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxshrink.errors import ModelError, first_line
from onnxshrink.timing import timed

__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "LoadedModel",
    "load",
    "lift_constants",
    "external_files",
    "tensor_bytes",
    "file_bytes",
    "write",
    "spill",
    "unspill",
]

logger = logging.getLogger(__name__)

# Above this many bytes of tensors a model is saved with external data (protobuf's limit is 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1 << 30


@dataclasses.dataclass
class LoadedModel:
    """A private IR copy of the user's model and where it came from."""

    model: ir.Model
    kind: str  # "path" | "proto" | "ir"
    path: Path | None = None
    lifted_constants: int = 0

    @property
    def protected_paths(self) -> set[Path]:
        """Files that an output must never overwrite: the model file and its external data."""
        paths = external_files(self.model)
        if self.path is not None:
            paths.add(self.path.resolve())
        return paths

    def release(self) -> ir.Model:
        """The model, no longer held here: whoever rewrites it holds its only reference."""
        model, self.model = self.model, None
        return model


def _read_proto(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise ModelError(f"{path}: no such file")
    if path.is_dir():
        raise ModelError(f"{path}: is a folder, not an ONNX model file")
    if path.stat().st_size == 0:
        raise ModelError(f"{path}: empty file, not an ONNX model")
    # The checker parses the file itself (file bytes + message in C++): run it before Python holds
    # its own copy, so loading peaks at ~2x the file, not 3x; its error is raised after the parse
    # and structure checks, which name the cause of a broken file more clearly.
    try:
        onnx.checker.check_model(str(path))
        invalid = None
    except Exception as e:
        invalid = e
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # DecodeError, UnicodeDecodeError, RuntimeError from the C parser...
        raise ModelError(
            f"{path}: not an ONNX model (protobuf parse failed: {first_line(e)}); "
            "is the file truncated or of another format?"
        ) from e
    _check_structure(proto, str(path))
    if invalid is not None:
        raise ModelError(f"{path}: invalid ONNX model: {first_line(invalid)}") from invalid
    return proto


def _check_structure(proto: onnx.ModelProto, where: str) -> None:
    """Reject protobuf that parsed but is not a model (random bytes often parse)."""
    if not proto.HasField("graph") or (not proto.graph.node and not proto.graph.output):
        raise ModelError(f"{where}: not an ONNX model (no graph); is the file truncated?")
    if proto.ir_version <= 0 or not proto.opset_import:
        raise ModelError(f"{where}: not an ONNX model (missing ir_version or opset_import)")
    if not proto.graph.output:
        raise ModelError(f"{where}: the graph has no outputs")
    if (bad := _not_utf8(proto.graph)) is not None:
        raise ModelError(
            f"{where}: the name {bad!r} is not valid UTF-8 (a corrupt file, or a broken "
            "exporter); ONNX names are UTF-8 text"
        )


def _not_utf8(graph: onnx.GraphProto) -> bytes | None:
    """The first name in ``graph`` (subgraphs included) that protobuf could not decode as UTF-8
    (it hands those over as bytes), or None."""
    for vi in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
        if isinstance(vi.name, bytes):
            return vi.name
    for node in graph.node:
        for text in (node.name, node.op_type, node.domain, *node.input, *node.output):
            if isinstance(text, bytes):
                return text
        for attr in node.attribute:
            for sub in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
                if (bad := _not_utf8(sub)) is not None:
                    return bad
    return None


def lift_constants(model: ir.Model) -> int:
    """Turn tensor-valued ``Constant`` nodes into initializers of their graph (If/Loop bodies
    included: their weights then count as params). Returns the number of nodes lifted."""
    count = 0
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        graph = node.graph
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            continue
        if len(node.attributes) != 1 or "value" not in node.attributes:
            continue
        out = node.outputs[0]
        if out.is_graph_output():
            continue
        attr = node.attributes["value"]
        if attr.is_ref():
            continue
        tensor = attr.as_tensor()
        name = out.name or f"{node.name}.value"
        init = ir.Value(
            name=name,
            shape=ir.Shape(tensor.shape),
            type=ir.TensorType(tensor.dtype),
            const_value=tensor,
        )
        out.name = None  # free the name for the initializer
        init.name = name
        graph.register_initializer(init)
        out.replace_all_uses_with(init)
        graph.remove(node, safe=True)
        count += 1
    if count:
        logger.debug("lifted %d Constant nodes to initializers", count)
    return count


@timed("load the model")
def load(source: str | os.PathLike | onnx.ModelProto | ir.Model) -> LoadedModel:
    """Loads ``source`` into a private ``ir.Model``; the caller's object is never modified."""
    if isinstance(source, ir.Model):
        loaded = LoadedModel(source.clone(), "ir")
    elif isinstance(source, onnx.ModelProto):
        _check_structure(source, "model")
        try:
            if source.ByteSize() < (1 << 31) - 1:
                onnx.checker.check_model(source)
            model = ir.serde.deserialize_model(source)
        except Exception as e:
            raise ModelError(f"invalid ONNX model: {first_line(e)}") from e
        loaded = LoadedModel(model, "proto")
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        proto = _read_proto(path)
        try:
            model = ir.serde.deserialize_model(proto)
        except Exception as e:
            raise ModelError(f"{path}: cannot read the model: {first_line(e)}") from e
        ir.external_data.set_base_dir(model.graph, str(path.resolve().parent))
        _check_external_files(model, path)
        loaded = LoadedModel(model, "path", path=path)
    else:
        raise ModelError(
            f"cannot load a model from {type(source).__name__}; "
            "give a path, an onnx.ModelProto or an onnx_ir.Model"
        )
    loaded.lifted_constants = lift_constants(loaded.model)
    return loaded


def _check_external_files(model: ir.Model, path: Path) -> None:
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            data = Path(tensor.path)
            if not data.exists():
                raise ModelError(
                    f"{path}: external data file '{tensor.location}' of tensor "
                    f"'{value.name}' is missing"
                )
            if data.stat().st_size < tensor.offset + tensor.length:
                raise ModelError(
                    f"{path}: external data file '{tensor.location}' is truncated "
                    f"(tensor '{value.name}' needs {tensor.offset + tensor.length} bytes)"
                )


def external_files(model: ir.Model) -> set[Path]:
    """The external data files the model's initializers point into."""
    files = set()
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                files.add(Path(value.const_value.path).resolve())
    return files


def tensor_bytes(model: ir.Model) -> int:
    """Bytes of all initializer tensors (what external data would hold)."""
    total = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


def file_bytes(path: str | os.PathLike) -> int:
    """Size on disk of a model file plus the external data files it references."""
    path = Path(path)
    total = path.stat().st_size
    proto = onnx.load(str(path), load_external_data=False)
    seen = set()
    for tensor in _all_proto_tensors(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if location and location not in seen:
                seen.add(location)
                data = path.parent / location
                if data.exists():
                    total += data.stat().st_size
    return total


def _all_proto_tensors(graph: onnx.GraphProto) -> Iterable[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            if attr.HasField("g"):
                yield from _all_proto_tensors(attr.g)
            for g in attr.graphs:
                yield from _all_proto_tensors(g)


def _in_memory_copies(model: ir.Model) -> list[tuple[ir.Value, ir.TensorProtocol]]:
    """Swap external tensors for in-memory ones; returns what to restore afterwards."""
    swapped = []
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                value.const_value = ir.Tensor(np.array(tensor.numpy()), name=tensor.name)
                swapped.append((value, tensor))
    return swapped


@timed("write a model")
def write(
    model: ir.Model, path: Path, *, external_data: bool | None = None, data_name: str | None = None
) -> int:
    """Writes ``model`` to ``path`` (not atomic; see :func:`save`). Returns the bytes written.

    With ``external_data=None`` the choice is automatic: external data when the tensors exceed
    :data:`EXTERNAL_DATA_THRESHOLD` or the model already keeps tensors in external files; the
    data file beside ``path`` is ``data_name`` (default ``<name>.data``).
    """
    if external_data is None:
        external_data = bool(external_files(model)) or tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    if external_data:
        location = data_name or f"{path.name}.data"
        ir.save(model, path, external_data=location, size_threshold_bytes=1024)
        return path.stat().st_size + (path.parent / location).stat().st_size
    swapped = _in_memory_copies(model)
    try:
        ir.save(model, path)
    finally:
        for value, tensor in swapped:
            value.const_value = tensor
    return path.stat().st_size


def spill(model: ir.Model, path: Path) -> list[tuple[ir.Value, ir.ExternalTensor]]:
    """Moves ``model``'s in-memory initializers into the file ``path``: each becomes an
    ``ir.ExternalTensor`` reading it back, so a model waiting for its turn holds no weights.
    Returns what :func:`unspill` reads back; the tensors themselves are not mutated."""
    spilled = []
    with path.open("wb") as f:
        for graph in model.graphs():
            for value in graph.initializers.values():
                tensor = value.const_value
                if tensor is None or isinstance(tensor, ir.ExternalTensor):
                    continue
                offset, data = f.tell(), tensor.tobytes()
                f.write(data)
                value.const_value = ir.ExternalTensor(
                    path.name, offset, len(data), tensor.dtype, shape=tensor.shape,
                    name=tensor.name, base_dir=path.parent,
                )  # fmt: skip
                spilled.append((value, value.const_value))
    return spilled


def unspill(spilled: list[tuple[ir.Value, ir.ExternalTensor]]) -> None:
    """What :func:`spill` moved out, back in memory (the file may then be deleted)."""
    for value, tensor in spilled:
        value.const_value = ir.Tensor(
            np.array(tensor.numpy()), dtype=tensor.dtype, name=tensor.name
        )
        tensor.release()
