"""One block as a PyTorch module, and the loop that fits its parameters to the original's output.

The block runs node by node through :mod:`onnxshrink.reconstruct.torch_ops`; its parameters
start from the compressed model's weights. Given x̂ (the block's input as the compressed model
computes it) and y (the original model's tensor at the block's output) on the calibration
samples, Adam minimises the mean squared error

    L(θ) = mean ‖f̂_θ(x̂) − y‖²

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

from onnxshrink.reconstruct.blocks import Block, constant
from onnxshrink.reconstruct.torch_ops import Unsupported, run_node

__all__ = ["Fit", "TorchBlock", "fit_block"]

logger = logging.getLogger(__name__)


class TorchBlock(torch.nn.Module):
    """``block`` computed by torch; its ``params`` are trainable, other constants fixed."""

    def __init__(self, block: Block) -> None:
        super().__init__()
        self.block = block
        self.weights = torch.nn.ParameterList(
            torch.nn.Parameter(torch.from_numpy(np.array(v.const_value.numpy(), np.float32)))
            for v in block.params
        )
        self.slot = {v.name: i for i, v in enumerate(block.params)}
        made = {v.name for n in block.nodes for v in n.outputs}
        self.consts: dict[str, torch.Tensor] = {}
        for node in block.nodes:
            for v in node.inputs:
                if v is None or v.name in made or v.name in self.slot or v is block.input:
                    continue
                arr = constant(v)
                if arr is None:
                    raise Unsupported(f"{node.name} reads {v.name!r}: not computed in the block")
                self.consts[v.name] = torch.from_numpy(np.array(arr))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env = {self.block.input.name: x}
        for node in self.block.nodes:
            args = [None if v is None else self._get(v.name, env) for v in node.inputs]
            for v, out in zip(node.outputs, run_node(node, args)):
                env[v.name] = out
        return env[self.block.output.name]

    def _get(self, name: str, env: dict) -> torch.Tensor:
        if name in env:
            return env[name]
        if name in self.slot:
            return self.weights[self.slot[name]]
        return self.consts[name]

    def arrays(self) -> dict[str, np.ndarray]:
        """The parameters' present values, by initializer name."""
        return {n: self.weights[i].detach().cpu().numpy().copy() for n, i in self.slot.items()}


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
    device = "cuda" if torch.cuda.is_available() else "cpu"  # untested here: no GPU in CI
    module.to(device)
    module.consts = {k: v.to(device) for k, v in module.consts.items()}
    xt, yt = torch.from_numpy(x[:-held]).to(device), torch.from_numpy(y[:-held]).to(device)
    xh, yh = torch.from_numpy(x[-held:]).to(device), torch.from_numpy(y[-held:]).to(device)
    best = before = _loss(module, xh, yh, batch)
    best_w, waited, stopped, step = module.arrays(), 0, "iterations", 0
    if before <= 1e-12 * float(torch.mean(yh**2)):  # the block is exact already
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
