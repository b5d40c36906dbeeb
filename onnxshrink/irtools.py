"""Small edits of the IR that passes share: constants behind values, fresh names, new inputs.

Names: ONNX wants value and node names unique in a graph. :func:`unique_name` returns ``base``
or ``base_1``, ``base_2``, ... -- the first not taken. Outside a :func:`names` scope it scans the
graph (O(nodes) per call); inside one (each pass runs in its own) the names of the graph are
gathered once and every name handed out is added, so a pass naming n things costs O(nodes + n).
A name set directly inside a scope (not through :func:`unique_name`) must be registered with
:func:`take`, or a later call could hand it out again.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from onnxshrink.timing import timed

__all__ = [
    "const_array",
    "infer_types",
    "inferred_dtypes",
    "insert_after_value",
    "names",
    "new_initializer",
    "set_const_input",
    "take",
    "unique_name",
    "weight_users_outside",
]

# id(graph) -> (the graph, weakly: trial copies come and go; the names taken in it)
_Names = dict[int, tuple[weakref.ref, set[str]]]
_SCOPE: contextvars.ContextVar[_Names | None] = contextvars.ContextVar("names", default=None)


@timed("shape inference")
def infer_types(model: ir.Model) -> None:
    """Fills in the element types and shapes onnx can infer where the file gave none; never
    raises (a model onnx cannot infer keeps what it has)."""
    import logging

    from onnx_ir.passes.common import ShapeInferencePass

    try:
        ShapeInferencePass(check_type=False, strict_mode=False, data_prop=False)(model)
    except Exception as e:  # inference is a help here, not a requirement
        logging.getLogger(__name__).debug("type inference failed: %s", e)


def inferred_dtypes(model: ir.Model) -> dict[str, ir.DataType]:
    """Value name -> element type, as given or inferred (on a copy: ``model`` is untouched)."""
    clone = model.clone()
    infer_types(clone)
    return {
        v.name: v.dtype
        for node in clone.graph
        for v in [*node.inputs, *node.outputs]
        if v is not None and v.name and v.dtype is not None
    }


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant behind ``value``, or None: through Identity chains, and through a Reshape /
    Unsqueeze / Squeeze of a constant (Paddle exports reshape every bias that way)."""
    while value is not None:
        if value.const_value is not None:
            return value.const_value.numpy()
        producer = value.producer()
        if producer is None or producer.domain not in ("", "ai.onnx"):
            return None
        if producer.op_type != "Identity":
            return _reshaped_const(producer)
        value = producer.inputs[0]
    return None


def _reshaped_const(node: ir.Node) -> np.ndarray | None:
    if node.op_type not in ("Reshape", "Unsqueeze", "Squeeze") or not node.inputs:
        return None
    data = const_array(node.inputs[0])
    if data is None or data.size > 1 << 16:  # biases and scales, not weights to copy
        return None
    second = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if node.op_type == "Reshape":
        if second is None or node.attributes.get_int("allowzero", 0):
            return None
        shape = [data.shape[i] if d == 0 else int(d) for i, d in enumerate(second.tolist())]
        return data.reshape(shape)
    attr = node.attributes.get("axes")
    axes = second if second is not None else (attr.as_ints() if attr is not None else None)
    if node.op_type == "Unsqueeze":
        if axes is None:
            return None
        rank = data.ndim + len(axes)
        return np.expand_dims(data, tuple(int(a) % rank for a in axes))
    if axes is None:
        return np.squeeze(data)
    return np.squeeze(data, tuple(int(a) % data.ndim for a in axes))


def weight_users_outside(value: ir.Value, node: ir.Node) -> list[ir.Node]:
    """Nodes other than ``node`` reading the same constant (through Identity chains too)."""
    while (p := value.producer()) is not None and p.op_type == "Identity":
        value = p.inputs[0]
    others, stack = [], [value]
    while stack:
        v = stack.pop()
        for user in v.consumers():
            if user is node:
                continue
            if user.op_type == "Identity":
                stack.append(user.outputs[0])
            else:
                others.append(user)
    return others


def _taken(graph: ir.Graph) -> set[str]:
    taken = set(graph.initializers) | {v.name for v in graph.inputs}
    taken |= {o.name for n in graph for o in n.outputs}
    taken |= {n.name for n in graph if n.name}  # node names too: ONNX wants them unique
    return taken


@contextlib.contextmanager
def names() -> Iterator[None]:
    """A scope in which :func:`unique_name` keeps each graph's taken names instead of
    re-scanning; nested scopes share the outermost one's."""
    if _SCOPE.get() is not None:
        yield
        return
    token = _SCOPE.set({})
    try:
        yield
    finally:
        _SCOPE.reset(token)


def _scoped(graph: ir.Graph) -> set[str] | None:
    scope = _SCOPE.get()
    if scope is None:
        return None
    entry = scope.get(id(graph))
    if entry is None or entry[0]() is not graph:  # new, or another graph at a freed one's id
        entry = scope[id(graph)] = (weakref.ref(graph), _taken(graph))
    return entry[1]


def take(graph: ir.Graph, name: str) -> str:
    """Registers ``name`` as taken in ``graph``'s scope (a name set directly); returns it."""
    if (taken := _scoped(graph)) is not None:
        taken.add(name)
    return name


def unique_name(graph: ir.Graph, base: str) -> str:
    """``base``, or ``base_<i>`` with the smallest i ≥ 1 that no value or node of ``graph`` has."""
    taken = _scoped(graph)
    if taken is None:
        taken = _taken(graph)
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return take(graph, name)


def insert_after_value(
    graph: ir.Graph,
    value: ir.Value,
    nodes: list[ir.Node],
    out: ir.Value,
    readers: set[int] | None = None,
) -> None:
    """Puts ``nodes`` (which read ``value`` and compute ``out``) right after ``value``'s producer,
    or first in the graph for an input or initializer, and moves every other reader of ``value``
    (only those whose id is in ``readers``, when given) to ``out``. Graph outputs are left to the
    caller."""
    for node, i in [(n, i) for n, i in value.uses() if n not in nodes]:
        if readers is None or id(node) in readers:
            node.replace_input_with(i, out)
    producer = value.producer()
    if producer is None:
        graph.insert_before(next(iter(graph)), nodes)
    else:
        graph.insert_after(producer, nodes)


def new_initializer(graph: ir.Graph, name: str, arr: np.ndarray) -> ir.Value:
    """A new initializer holding ``arr``, named ``name`` or the first free ``name_<k>``."""
    value = ir.val(unique_name(graph, name), const_value=ir.tensor(np.ascontiguousarray(arr)))
    graph.register_initializer(value)
    return value


def set_const_input(
    graph: ir.Graph, node: ir.Node, index: int, arr: np.ndarray, what: str
) -> ir.Value:
    """Gives ``node`` a new initializer ``arr`` at input ``index`` (appending if needed)."""
    value = new_initializer(graph, f"{node.name or node.op_type}.{what}", arr)
    if index >= len(node.inputs):
        node.resize_inputs(index + 1)
    node.replace_input_with(index, value)
    return value
