"""One block as a PyTorch module, and the loop that fits its parameters to the original's output.

The block runs node by node through :mod:`onnxshrink.reconstruct.torch_ops`; its parameters
start from the compressed model's weights. Given x̂ (the block's input as the compressed model
computes it) and y (the original model's tensor at the block's output) on the calibration
samples, Adam minimises the mean squared error after the block's *tail* t (the Relu / Clip /
QuantizeLinear → DequantizeLinear that alone reads its output: what the rest sees of it)

    L(θ) = mean ‖t(f̂_θ(x̂)) − t(y)‖²

over mini-batches of the training samples; every ``check`` steps the loss on the held-out
samples is measured and the best parameters so far are kept, stopping after ``patience``
checks without improvement, after ``iterations`` steps, or at the time limit. The result is
the best held-out state and both held-out losses (before, after).
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import torch

from onnxshrink.errors import one_line
from onnxshrink.reconstruct.blocks import Block, constant, is_scale
from onnxshrink.reconstruct.torch_ops import Unsupported, code_range, per_axis, round_ste, run_node

__all__ = ["Fit", "TorchBlock", "fit_block"]

logger = logging.getLogger(__name__)


class TorchBlock(torch.nn.Module):
    """``block`` computed by torch; its ``params`` are trainable, other constants fixed.

    An activation Q/DQ pair's scale, when among the params, is trained as it is (LSQ: the
    rounding's gradient straight through; :mod:`onnxshrink.reconstruct.scales`).
    A quantized weight (integer codes q read by a DequantizeLinear with scale s and zero point
    z) is trained as the float weight w = (q − z)·s and fed to the DequantizeLinear as
    P(clamp(round(w / s) + z)): the rounding -- and P, the pair rule of onnxruntime's x86 int8
    kernels (:func:`onnxshrink.analysis.saturation.make_safe`) -- in the forward pass, the
    gradient straight through. So the codes trained, measured and written are the same.
    """

    def __init__(self, block: Block) -> None:
        super().__init__()
        self.block = block
        self.codes: dict[str, tuple] = {}  # name -> (scale, zero point, lo, hi), broadcast
        self.pairs: dict[str, tuple] = {}  # name -> the int8 weight pairs of the pair rule
        self.tail = _tail(block.output)  # the activation / QDQ that reads the output
        self.per_sample = False  # set by :meth:`batching`
        # an op that can make inf (Reciprocal of a variance rounded to 0): where it is
        # saturated, the gradient is 0 · inf = NaN, made 0 where it arises, or it spreads
        # to whole weights (a hook per tensor; blocks without such ops do without)
        self.guard = any(n.op_type in _INF for n in block.nodes)
        # learned activation scales (LSQ) stay positive
        self.positive = {v.name for v in block.params if is_scale(v)}
        start = [self._start(v) for v in block.params]
        self.weights = torch.nn.ParameterList(torch.nn.Parameter(w) for w in start)
        self.slot = {v.name: i for i, v in enumerate(block.params)}
        made = {v.name for n in [*block.nodes, *self.tail] for v in n.outputs}
        self.consts: dict[str, torch.Tensor] = {}
        for node in [*block.nodes, *self.tail]:
            for v in node.inputs:
                if v is None or v.name in made or v.name in self.slot or v is block.input:
                    continue
                arr = constant(v)
                if arr is None:
                    raise Unsupported(f"{node.name} reads {v.name!r}: not computed in the block")
                self.consts[v.name] = torch.from_numpy(np.array(arr))

    def _start(self, v) -> torch.Tensor:
        arr = np.array(v.const_value.numpy())
        if arr.dtype.kind == "f":
            return torch.from_numpy(arr.astype(np.float32))
        dq = v.consumers()[0]
        q = torch.from_numpy(arr)
        zp = constant(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
        zp = torch.zeros((), dtype=q.dtype) if zp is None else torch.from_numpy(np.array(zp))
        scale = torch.from_numpy(np.array(constant(dq.inputs[1]), np.float32))
        lo, hi = code_range(zp)
        s, z = per_axis(dq, scale, q), per_axis(dq, zp, q).float()
        self.codes[v.name] = (s, z, lo, hi)
        if (idx := _pairs(v, arr)) is not None:
            self.pairs[v.name] = idx
        return (q.float() - z) * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_sample:  # the graph fixes the batch at 1: one sample at a time
            return torch.cat([self._forward(x[i : i + 1]) for i in range(len(x))])
        return self._forward(x)

    def batching(self, x: np.ndarray, y: np.ndarray) -> None:
        """Runs the block one sample at a time if its graph fixes the batch at 1 (a Reshape to
        [1, ...], as exporters write for batch-1 models, folds a batch of 2 into another axis);
        raises :class:`Unsupported` if neither way gives the original's output shape."""
        with torch.no_grad():
            for one in (False, True):
                self.per_sample = one
                try:
                    shape = tuple(self(torch.from_numpy(x[:2])).shape)
                except RuntimeError as e:  # a Reshape to [1, 4, 36] of two samples' elements
                    got = one_line(e)
                    continue
                if shape == y[:2].shape:
                    return
                got = f"comes out {shape[1:]}"
        raise Unsupported(f"its output {got}, the original's {y.shape[1:]}")

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        env = {self.block.input.name: x}
        for node in self.block.nodes:
            args = [None if v is None else self._get(v.name, env) for v in node.inputs]
            for v, out in zip(node.outputs, run_node(node, args)):
                if self.guard and out.requires_grad:
                    out.register_hook(_finite)
                env[v.name] = out
        return self.see(env[self.block.output.name])

    def see(self, y: torch.Tensor) -> torch.Tensor:
        """``y`` through the tail: what the rest of the model sees of the block's output."""
        for node in self.tail:
            args = [None if v is None else self._get(v.name, {}) for v in node.inputs[1:]]
            y = run_node(node, [y, *args])[0]
        return y

    def _get(self, name: str, env: dict) -> torch.Tensor:
        if name in env:
            return env[name]
        if name in self.slot:
            w = self.weights[self.slot[name]]
            if name in self.codes:
                s, z, lo, hi = self.codes[name]
                code = torch.clamp(round_ste(w / s) + z, lo, hi)
                if name in self.pairs:  # the pair rule, its gradient straight through
                    safe = self._safe(name, code.detach(), (w / s + z).detach())
                    code = code + (safe - code).detach()
                return code
            return w.clamp_min(1e-12) if name in self.positive else w
        return self.consts[name]

    def _safe(self, name: str, code: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from onnxshrink.analysis.saturation import make_safe

        q = code.cpu().numpy().astype(np.int32)
        safe = make_safe(q, target.cpu().numpy(), self.pairs[name])[0]
        return torch.from_numpy(safe.astype(np.float32)).to(code.device)

    def seen(self, y: np.ndarray) -> np.ndarray:
        """:meth:`see` on an array (the original's output, so both sides are compared alike)."""
        with torch.no_grad():
            return self.see(torch.from_numpy(y)).numpy()

    def arrays(self) -> dict[str, np.ndarray]:
        """The parameters' present values, by initializer name: float weights as they are,
        quantized ones as the integer codes the forward pass feeds the DequantizeLinear."""
        out = {}
        with torch.no_grad():
            for v in self.block.params:
                got = self._get(v.name, {}).cpu().numpy()
                out[v.name] = (
                    got.astype(v.const_value.numpy().dtype) if v.name in self.codes else got.copy()
                )
        return out


_INF = ("Reciprocal", "Div", "Sqrt", "Log", "Pow", "Exp")


def _finite(grad: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(grad, 0.0, 0.0, 0.0)


_TAIL = ("Relu", "Clip", "QuantizeLinear", "DequantizeLinear")


def _tail(value) -> list:
    """The chain of Relu / Clip / QuantizeLinear / DequantizeLinear nodes that alone read
    ``value`` (each reading the one before, other inputs constant): the loss is taken after
    them, on what the rest of the model sees -- a QuantizeLinear clips to its calibrated range,
    which can be far inside the original's Clip."""
    chain: list = []
    while len(chain) < 3 and not value.is_graph_output() and len(value.consumers()) == 1:
        node = value.consumers()[0]
        if node.op_type not in _TAIL or node.domain not in ("", "ai.onnx"):
            break
        if node.inputs[0] is not value:
            break
        if any(v is not None and constant(v) is None for v in node.inputs[1:]):
            break
        chain.append(node)
        value = node.outputs[0]
    return chain


def _pairs(v, code: np.ndarray):
    """The pairs of int8 weight codes ``v`` that onnxruntime's x86 u8s8 kernels add in int16
    (:func:`onnxshrink.analysis.saturation.weight_pairs`), or None: ``quantize`` wrote them
    within the pair rule, the same integers on every CPU, and reconstruction keeps it."""
    from onnxshrink.analysis.saturation import weight_pairs

    users = v.consumers()[0].outputs[0].consumers()
    if code.dtype != np.int8 or len(users) != 1:
        return None
    return weight_pairs(users[0], code.shape)


@dataclasses.dataclass
class Fit:
    before: float  # held-out mean squared error with the starting weights
    after: float  # with the best weights found
    steps: int
    seconds: float
    stopped: str  # "patience", "iterations", "time" or "exact" (nothing to lower)
    weights: dict[str, np.ndarray]  # the best weights, by initializer name


def _groups(module: TorchBlock, lr: float) -> list[dict]:
    """One Adam group per tensor, its step ``lr`` times the tensor's RMS (biases that are zero:
    a tenth of the median RMS): Adam moves every weight by about its group's step, so a
    relative step treats small and large layers alike."""
    rms = [float(torch.sqrt(torch.mean(p.detach() ** 2))) for p in module.weights]
    floor = 0.1 * float(np.median(rms)) if rms else 0.0
    return [{"params": [p], "lr": lr * max(r, floor, 1e-8)} for p, r in zip(module.weights, rms)]


def _tensor(arr: np.ndarray, device: str) -> torch.Tensor:
    """``arr`` on ``device``; a rank-4 batch channels last, the layout oneDNN's convolutions run
    fastest in on the CPU (the values are the same; sums may round differently)."""
    t = torch.from_numpy(arr).to(device)
    return t.contiguous(memory_format=torch.channels_last) if t.ndim == 4 else t


def _loss(module: TorchBlock, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    with torch.no_grad():
        total = sum(
            float(torch.sum((module(x[i : i + batch]) - y[i : i + batch]) ** 2))
            for i in range(0, len(x), batch)
        )
    return total / y.numel()


def fit_block(
    module: TorchBlock,
    x: np.ndarray,
    y: np.ndarray,
    held: int,
    *,
    iterations: int,
    lr: float,
    batch: int,
    seconds: float | None,
    check: int = 25,
    patience: int = 4,
    seed: int = 0,
    progress=None,
) -> Fit:
    """Fits ``module`` to ``y`` from ``x``; the last ``held`` samples are held out."""
    start = time.perf_counter()
    module.batching(x, y)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # untested here: no GPU in CI
    module.to(device)
    module.consts = {k: v.to(device) for k, v in module.consts.items()}
    module.codes = {k: tuple(t.to(device) if torch.is_tensor(t) else t for t in c)
                    for k, c in module.codes.items()}  # fmt: skip
    xt, yt = _tensor(x[:-held], device), _tensor(y[:-held], device)
    xh, yh = _tensor(x[-held:], device), _tensor(y[-held:], device)
    best = before = _loss(module, xh, yh, batch)
    best_w, waited, stopped, step = module.arrays(), 0, "iterations", 0
    scale = float(torch.mean(yt**2) + torch.mean(yh**2))  # all samples: a held-out few can be ~0
    if before <= 1e-10 * scale:  # exact already (float rounding apart)
        return Fit(before, before, 0, time.perf_counter() - start, "exact", best_w)
    opt = torch.optim.Adam(_groups(module, lr))
    gen = torch.Generator().manual_seed(seed)  # the sample order, on the CPU
    order = torch.randperm(len(xt), generator=gen)
    for step in range(1, iterations + 1):
        if len(order) < batch:
            order = torch.cat([order, torch.randperm(len(xt), generator=gen)])
        idx, order = order[:batch], order[batch:]
        opt.zero_grad()
        loss = torch.mean((module(xt[idx]) - yt[idx]) ** 2)
        loss.backward()
        opt.step()
        if progress is not None:
            progress(1)
        if step % check and step != iterations:
            continue
        now = _loss(module, xh, yh, batch)
        logger.debug("step %d: train loss %.4g, held-out %.4g", step, float(loss.detach()), now)
        if now < best:
            best, best_w, waited = now, module.arrays(), 0
        else:
            waited += 1
        if waited >= patience:
            stopped = "patience"
            break
        if seconds is not None and time.perf_counter() - start > seconds:
            stopped = "time"
            break
    took = time.perf_counter() - start
    logger.debug("block fit: %.4g -> %.4g in %d steps, %.1f s", before, best, step, took)
    return Fit(before, best, step, took, stopped, best_w)
