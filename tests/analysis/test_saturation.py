"""The pair rule: which int8 weight pairs onnxruntime's AVX2 kernels saturate on, and making
weights keep it. The kernel tests run onnxruntime on an emulated CPU without VNNI (QEMU's
Haswell, :mod:`tests.emulated_cpu`) and natively, against a numpy model of both kernels."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

from onnxshrink.analysis.saturation import LIMIT, bad_pairs, make_safe, pair_scale, pairs
from onnxshrink.cpu import this_cpu
from tests import emulated_cpu

needs_qemu = emulated_cpu.needs_qemu


def _products(w: np.ndarray, x_of) -> np.ndarray:
    """x * w for every flat weight index (``x_of(i)``: the input that weight i multiplies)."""
    idx = np.arange(w.size)
    return w.ravel().astype(np.int64) * x_of(idx)


def _accumulate(prod: np.ndarray, idx, out: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(exact, saturating) accumulators of the ``n`` outputs (``out[i]``: the output weight i
    adds to): the saturating kernel adds each pair in int16 first (:func:`pairs` order)."""
    exact = np.bincount(out, prod, n)
    ia, ib = idx
    paired = np.zeros(prod.size, bool)
    paired[ia] = paired[ib] = True
    sat = np.bincount(out[ia], np.clip(prod[ia] + prod[ib], -32768, 32767), n)
    return exact.astype(np.int64), (sat + np.bincount(out, np.where(paired, 0, prod), n)).astype(
        np.int64
    )


# -- the numpy side --------------------------------------------------------------------------
def test_pairs_follow_mlas_order():
    # Conv [O=1, C=3, 3x3]: k = tap * 3 + c, pairs (k, k+1): (t0 c0, t0 c1), (t0 c2, t1 c0), ...
    ia, ib = pairs("Conv", (1, 3, 3, 3))
    flat = lambda c, t: c * 9 + t  # noqa: E731 -- ONNX layout index of (c, tap)
    got = set(zip(ia.tolist(), ib.tolist()))
    assert (flat(0, 0), flat(1, 0)) in got and (flat(2, 0), flat(0, 1)) in got
    assert (flat(0, 0), flat(0, 1)) not in got  # taps of one channel are not paired
    assert len(ia) == 13  # 27 inputs: 13 pairs, the last alone
    assert pairs("Conv", (16, 1, 3, 3), group=16) is None  # depthwise: a 16-bit kernel
    assert pairs("Conv", (32, 1, 3, 3), group=16) is not None  # multiplier 2: a GEMM over taps
    ia, ib = pairs("Gemm", (10, 4), trans_b=1)  # [N, K]: pairs along K within each row
    assert list(zip(ia[:2], ib[:2])) == [(0, 1), (2, 3)]
    ia, ib = pairs("MatMul", (4, 3))  # [K, N]: pairs of rows, per column
    assert list(zip(ia[:3], ib[:3])) == [(0, 3), (6, 9), (1, 4)]


def test_bad_pairs_is_the_int16_bound():
    idx = pairs("MatMul", (2, 6))
    q = np.array([[127, 127, 64, -64, -64, -127], [1, 2, 64, -65, -65, 0]], np.int8)
    # pairs of rows per column; sums 128, 129, 128, -129, -129, -127: three break |a + b| <= 128
    assert bad_pairs(q, idx) == 3
    assert 255 * LIMIT <= 32767 < 255 * (LIMIT + 1)


@pytest.mark.parametrize("seed", range(5))
def test_make_safe_moves_least(seed):
    rng = np.random.default_rng(seed)
    t = rng.uniform(-127, 127, (8, 64))  # unrounded weights in grid units
    t[:, ::2] = np.sign(t[:, 1::2]) * rng.uniform(60, 127, (8, 32))  # many same-sign large pairs
    q = np.clip(np.round(t), -127, 127)
    idx = pairs("Gemm", t.shape, trans_b=1)
    assert bad_pairs(q, idx) > 20
    safe, moved = make_safe(q, t, idx)
    assert bad_pairs(safe, idx) == 0 and moved > 0
    changed = safe.astype(int) != q
    assert np.all(np.abs(safe.astype(int) - q)[changed] >= 1)
    # each bad pair: no other split of the same total move has a smaller squared error
    flat_q, flat_t, flat_s = q.ravel(), t.ravel(), safe.astype(float).ravel()
    for a, b in zip(*idx):
        s = flat_q[a] + flat_q[b]
        if abs(s) <= LIMIT:
            assert flat_s[a] == flat_q[a] and flat_s[b] == flat_q[b]
            continue
        e, sign = abs(s) - LIMIT, np.sign(s)
        best = min(
            (
                (flat_q[a] - sign * d - flat_t[a]) ** 2
                + (flat_q[b] - sign * (e - d) - flat_t[b]) ** 2
            )
            for d in range(int(e) + 1)
        )
        got = (flat_s[a] - flat_t[a]) ** 2 + (flat_s[b] - flat_t[b]) ** 2
        assert got <= best + 1e-9


def test_pair_scale_is_the_finest_safe_grid():
    w = np.array([[1.0, 0.9, -0.2, 0.1], [0.5, -0.5, 0.25, 0.25]])
    idx = pairs("Gemm", w.shape, trans_b=1)
    s = pair_scale(w, idx, 0)
    np.testing.assert_allclose(
        s, [1.9 / LIMIT, 0.5 / LIMIT]
    )  # row 2: opposite signs, 0.5 from (.25, .25)
    scale = np.maximum(np.abs(w).max(1) / 127, s)
    q = np.clip(np.round(w / scale[:, None]), -127, 127)
    assert bad_pairs(q, idx) == 0


# -- onnxruntime: which pairs its kernels saturate on --------------------------------------
def _qlinearconv(name, cin, cout, k, group, rng):
    """x u8 [1, cin, k, k] -> one output pixel per channel (no padding). Each output channel has
    one pair of large same-sign weights: a pair of MLAS's order on even channels (saturates on
    AVX2), two weights that are not a pair on odd ones (never saturates)."""
    cg = cin // group
    w = np.zeros((cout, cg, k, k), np.int8)
    flat = w.reshape(cout, -1)
    per_out = cg * k * k
    idx = pairs("Conv", w.shape, group=group)
    mine = (
        [(int(a), int(b)) for a, b in zip(*idx) if a < per_out] if idx else []
    )  # alike in every channel
    partner = dict(mine) | {b: a for a, b in mine}
    for o in range(cout):
        if o % 2 == 0 and mine:
            a, b = mine[rng.integers(len(mine))]
        else:
            a = int(rng.integers(per_out))
            b = int(rng.choice([c for c in range(per_out) if c != a and partner.get(a) != c]))
        sign = rng.choice([-1, 1])
        flat[o, a], flat[o, b] = sign * rng.integers(70, 128), sign * rng.integers(70, 128)
    ys = 512.0 if cg > 1 or cout // group > 1 else 4096.0
    inits = [
        nh.from_array(np.array(1.0, np.float32), f"{name}_xs"),
        nh.from_array(np.array(0, np.uint8), f"{name}_xz"),
        nh.from_array(w, f"{name}_w"),
        nh.from_array(np.ones(cout, np.float32), f"{name}_ws"),
        nh.from_array(np.zeros(cout, np.int8), f"{name}_wz"),
        nh.from_array(np.array(ys, np.float32), f"{name}_ys"),
        nh.from_array(np.array(128, np.uint8), f"{name}_yz"),
    ]
    node = oh.make_node(
        "QLinearConv",
        [
            f"{name}_x",
            f"{name}_xs",
            f"{name}_xz",
            f"{name}_w",
            f"{name}_ws",
            f"{name}_wz",
            f"{name}_ys",
            f"{name}_yz",
        ],
        [f"{name}_y"],
        group=group,
        name=name,
    )
    x = rng.integers(200, 256, (1, cin, k, k)).astype(np.uint8)
    taps = k * k

    def x_of(i):
        o, c, t = np.unravel_index(i, (cout, cg, taps))
        return x.reshape(cin, taps)[(o // (cout // group)) * cg + c, t].astype(np.int64)

    idx = pairs("Conv", w.shape, group=group) or (np.array([], int), np.array([], int))
    exact, sat = _accumulate(_products(w, x_of), idx, np.arange(w.size) // (cg * taps), cout)
    predict = lambda acc: np.clip(np.round(acc / ys) + 128, 0, 255)  # noqa: E731
    return node, inits, x, predict(exact), predict(sat)


def _matmulinteger(name, m, k, n):
    """B [k, n] with pair sums of +-128 (safe) and +-129, +-200 (not), A all 255."""
    b = np.zeros((k, n), np.int8)
    sums = itertools.cycle(
        [(64, 64), (127, 1), (64, 65), (127, 2), (-64, -64), (-64, -65), (100, 100), (127, -127)]
    )
    for col in range(n):
        for row in range(0, k - 1, 2):
            b[row, col], b[row + 1, col] = next(sums)
    b[k - 1, :] = 127 if k % 2 else b[k - 1, :]
    a = np.full((m, k), 255, np.uint8)
    node = oh.make_node("MatMulInteger", [f"{name}_a", f"{name}_b"], [f"{name}_y"], name=name)
    inits = [nh.from_array(b, f"{name}_b")]
    exact, sat = [], []
    for r in range(m):
        e, s = _accumulate(
            _products(b, lambda i: a[r, i // n].astype(np.int64)),
            pairs("MatMul", b.shape),
            np.arange(b.size) % n,
            n,
        )
        exact.append(e)
        sat.append(s)
    return node, inits, a, np.array(exact), np.array(sat)


def _kernel_model():
    rng = np.random.default_rng(0)
    cases = {
        "sym1x1": _qlinearconv("sym1x1", 8, 16, 1, 1, rng),  # MLAS ConvSym path (C_in % 4 == 0)
        "sym3x3": _qlinearconv("sym3x3", 4, 16, 3, 1, rng),
        "odd3x3": _qlinearconv("odd3x3", 3, 16, 3, 1, rng),  # GEMM path, pairs across taps
        "gemm3x3": _qlinearconv("gemm3x3", 6, 10, 3, 1, rng),  # C_out % 8 != 0: GEMM path
        "grouped": _qlinearconv("grouped", 8, 16, 3, 2, rng),
        "depthwise": _qlinearconv(
            "depthwise", 16, 16, 3, 16, rng
        ),  # 16-bit kernel: never saturates
        "gemv": _matmulinteger("gemv", 1, 9, 16),  # one row: MLAS's GEMV kernel
        "gemm": _matmulinteger("gemm", 4, 9, 16),
    }
    nodes, inits, ins, outs, feeds = [], [], [], [], {}
    for name, (node, init, x, _, _) in cases.items():
        nodes.append(node)
        inits += init
        dtype = TensorProto.UINT8
        ins.append(oh.make_tensor_value_info(node.input[0], dtype, list(x.shape)))
        out_type = TensorProto.UINT8 if node.op_type == "QLinearConv" else TensorProto.INT32
        outs.append(oh.make_tensor_value_info(node.output[0], out_type, None))
        feeds[node.input[0]] = x
    model = oh.make_model(
        oh.make_graph(nodes, "kernels", ins, outs, inits), opset_imports=[oh.make_opsetid("", 13)]
    )
    model.ir_version = 8
    return model, feeds, {k: (v[3], v[4]) for k, v in cases.items()}


def _check(outputs, expected, names, saturating: bool):
    for name, got in zip(names, outputs):
        exact, sat = expected[name]
        want = sat if saturating else exact
        np.testing.assert_allclose(
            got.reshape(want.shape), want, atol=1, err_msg=name
        )  # u8: one rounding step


def test_native_kernels_follow_the_pair_rule():
    """This machine's kernels, optimized session or not: exact where it has VNNI/AMX,
    pair-saturating where not."""
    from tests.helpers import ort_run

    model, feeds, expected = _kernel_model()
    names = list(expected)
    native = this_cpu().int8 == "saturating"
    # QLinearConv / MatMulInteger are kernels of their own: a session without graph
    # optimizations runs the same MLAS code, so it saturates on this CPU as an optimized one does
    _check(ort_run(model, feeds), expected, names, saturating=native)
    # with ONNXSHRINK_TEST_CPU=Haswell, ort_run's optimized sessions run on the emulated AVX2 CPU
    saturating = native or bool(os.environ.get("ONNXSHRINK_TEST_CPU"))
    _check(ort_run(model, feeds, optimize=True), expected, names, saturating=saturating)


@needs_qemu
def test_avx2_kernels_saturate_exactly_on_pairs_that_break_the_rule():
    model, feeds, expected = _kernel_model()
    names = list(expected)
    # the cases are built so that saturation shows: a model of the kernel that got the pairs
    # wrong (or an exact kernel) would fail here
    for name in ("sym1x1", "sym3x3", "odd3x3", "gemm3x3", "grouped", "gemv", "gemm"):
        exact, sat = expected[name]
        assert np.abs(exact - sat).max() > 10, name
        if name not in ("gemv", "gemm"):  # odd output channels: two large weights, not a pair
            np.testing.assert_array_equal(exact[1::2], sat[1::2])
    np.testing.assert_array_equal(*expected["depthwise"])
    _check(emulated_cpu.run(model, feeds), expected, names, saturating=True)


@needs_qemu
def test_emulated_cpu_is_seen_as_avx2():
    import subprocess
    import sys

    done = subprocess.run(
        [
            emulated_cpu.QEMU,
            "-cpu",
            emulated_cpu.CPU_MODEL,
            sys.executable,
            "-c",
            "from onnxshrink.cpu import this_cpu; c = this_cpu(); print(c.int8, c.int8_kernel)",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.split("\n")[0] == "saturating AVX2 (no VNNI)", done.stderr[-300:]


def test_unsafe_layers_names_the_layers_that_break_the_rule():
    import onnx_ir as ir

    from onnxshrink.analysis.saturation import unsafe_layers

    model, _, _ = _kernel_model()
    want = {}
    for node in model.graph.node:
        w = next(
            nh.to_array(i)
            for i in model.graph.initializer
            if i.name == node.input[3 if node.op_type == "QLinearConv" else 1]
        )
        op = "Conv" if node.op_type == "QLinearConv" else "MatMul"
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if n := bad_pairs(w, pairs(op, w.shape, group=group)):
            want[node.name] = n
    assert "depthwise" not in want and {"gemv", "gemm", "sym1x1"} <= set(want)
    assert unsafe_layers(ir.from_proto(model)) == want
