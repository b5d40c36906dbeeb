"""A Llama-style decoder with random weights, written one tensor at a time to external data.

Token embedding, ``layers`` blocks of RMSNorm -> multi-head causal self-attention with rotary
position embedding -> residual, RMSNorm -> SwiGLU MLP -> residual, a final RMSNorm and an untied
``lm_head``; input ``input_ids`` int64 [batch, sequence] (both dynamic, sequence <= ``context``),
output ``logits`` [batch, sequence, vocab]; opset 17, plain ONNX ops, no KV cache. Weights are
N(0, 0.02²), norms ones. Tensors are written straight into ``<name>.data`` (64 KiB-aligned, so
onnxruntime can map them), so building a 3 GB model holds one tensor in memory, not the model.

    python models/decoder.py                      # ~3.2 GB: 13 layers, width 2048 (the default)
    python models/decoder.py --layers 2 --hidden 256 --out /tmp/tiny.onnx
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.common import cache_dir  # noqa: E402

ALIGN = 1 << 16


@dataclasses.dataclass(frozen=True)
class Config:
    layers: int = 13
    hidden: int = 2048
    heads: int = 16
    intermediate: int = 5632
    vocab: int = 32000
    context: int = 512

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


class _Writer:
    """Appends tensors to one external data file and returns their (data-less) TensorProtos."""

    def __init__(self, path: Path, seed: int) -> None:
        self.path, self.file, self.rng = path, open(path, "wb"), np.random.default_rng(seed)

    def tensor(self, name: str, array: np.ndarray) -> TensorProto:
        offset = -self.file.tell() % ALIGN + self.file.tell()
        self.file.seek(offset)
        self.file.write(np.ascontiguousarray(array).tobytes())
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=array.shape)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (
            ("location", self.path.name),
            ("offset", offset),
            ("length", array.nbytes),
        ):
            t.external_data.add(key=key, value=str(value))
        return t

    def random(self, name: str, *shape: int) -> TensorProto:
        return self.tensor(name, 0.02 * self.rng.standard_normal(shape, dtype=np.float32))


def _rope_tables(cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    inv = 1.0 / 10000 ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim)
    angles = np.outer(np.arange(cfg.context), inv)
    angles = np.concatenate([angles, angles], axis=1).astype(np.float32)  # [context, head_dim]
    return np.cos(angles), np.sin(angles)


def build(cfg: Config, path: Path, seed: int = 0) -> Path:
    """Writes the model to ``path`` and its weights to ``path.name + '.data'`` beside it."""
    path = Path(path)
    w = _Writer(path.with_name(path.name + ".data"), seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []

    def node(op: str, inputs: list[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def const(name: str, array: np.ndarray) -> str:
        inits.append(onnx.numpy_helper.from_array(array, name))
        return name

    def rms_norm(x: str, prefix: str) -> str:
        inits.append(w.tensor(f"{prefix}.weight", np.ones(cfg.hidden, np.float32)))
        square = node("Mul", [x, x], f"{prefix}/square")
        mean = node("ReduceMean", [square], f"{prefix}/mean", axes=[-1], keepdims=1)
        rms = node("Sqrt", [node("Add", [mean, "eps"], f"{prefix}/add_eps")], f"{prefix}/rms")
        return node("Mul", [node("Div", [x, rms], f"{prefix}/div"), f"{prefix}.weight"], prefix)

    def linear(x: str, name: str, fan_in: int, fan_out: int) -> str:
        inits.append(w.random(f"{name}.weight", fan_in, fan_out))
        return node("MatMul", [x, f"{name}.weight"], name)

    def heads(x: str, name: str, rotate: bool) -> str:
        split = node("Reshape", [x, "heads_shape"], f"{name}/split_heads")
        x = node("Transpose", [split], f"{name}/bhtd", perm=[0, 2, 1, 3])
        if not rotate:
            return x
        nodes.append(
            helper.make_node("Split", [x, "halves"], [f"{name}/x1", f"{name}/x2"], axis=-1)
        )
        neg = node("Neg", [f"{name}/x2"], f"{name}/neg_x2")
        rotated = node("Concat", [neg, f"{name}/x1"], f"{name}/rotated", axis=-1)
        cos = node("Mul", [x, "cos"], f"{name}/x_cos")
        return node("Add", [cos, node("Mul", [rotated, "sin"], f"{name}/rot_sin")], f"{name}/rope")

    cos, sin = _rope_tables(cfg)
    const("eps", np.array(1e-6, np.float32))
    const("heads_shape", np.array([0, 0, cfg.heads, cfg.head_dim], np.int64))
    const("merge_shape", np.array([0, 0, cfg.hidden], np.int64))
    const("halves", np.array([cfg.head_dim // 2] * 2, np.int64))
    const("scale", np.array(1 / np.sqrt(cfg.head_dim), np.float32))
    const("zero", np.array([0], np.int64))
    const("one", np.array([1], np.int64))
    inits += [w.tensor("cos_table", cos), w.tensor("sin_table", sin)]
    # sequence length T -> rotary tables [T, head_dim] and the causal mask [T, T]
    length = node("Slice", [node("Shape", ["input_ids"], "ids_shape"), "one", "two"], "length")
    const("two", np.array([2], np.int64))
    node("Slice", ["cos_table", "zero", length, "zero"], "cos")
    node("Slice", ["sin_table", "zero", length, "zero"], "sin")
    square = node("Concat", [length, length], "mask_shape", axis=0)
    full = node("ConstantOfShape", [square], "mask_full",
                value=helper.make_tensor("v", TensorProto.FLOAT, [1], [-1e9]))  # fmt: skip
    node("Trilu", [full, "one_scalar"], "mask", upper=1)
    const("one_scalar", np.array(1, np.int64))

    inits.append(w.random("embed_tokens.weight", cfg.vocab, cfg.hidden))
    x = node("Gather", ["embed_tokens.weight", "input_ids"], "embed")
    for i in range(cfg.layers):
        p = f"layers.{i}"
        h = rms_norm(x, f"{p}.input_layernorm")
        q = heads(linear(h, f"{p}.self_attn.q_proj", cfg.hidden, cfg.hidden), f"{p}/q", True)
        k = heads(linear(h, f"{p}.self_attn.k_proj", cfg.hidden, cfg.hidden), f"{p}/k", True)
        v = heads(linear(h, f"{p}.self_attn.v_proj", cfg.hidden, cfg.hidden), f"{p}/v", False)
        kt = node("Transpose", [k], f"{p}/k_t", perm=[0, 1, 3, 2])
        scores = node("Mul", [node("MatMul", [q, kt], f"{p}/qk"), "scale"], f"{p}/scores")
        probs = node(
            "Softmax", [node("Add", [scores, "mask"], f"{p}/masked")], f"{p}/probs", axis=-1
        )
        ctx = node(
            "Transpose", [node("MatMul", [probs, v], f"{p}/ctx")], f"{p}/bthd", perm=[0, 2, 1, 3]
        )
        ctx = node("Reshape", [ctx, "merge_shape"], f"{p}/merged")
        x = node(
            "Add",
            [x, linear(ctx, f"{p}.self_attn.o_proj", cfg.hidden, cfg.hidden)],
            f"{p}/attn_out",
        )
        h = rms_norm(x, f"{p}.post_attention_layernorm")
        gate = linear(h, f"{p}.mlp.gate_proj", cfg.hidden, cfg.intermediate)
        silu = node("Mul", [gate, node("Sigmoid", [gate], f"{p}/sigmoid")], f"{p}/silu")
        up = linear(h, f"{p}.mlp.up_proj", cfg.hidden, cfg.intermediate)
        down = linear(
            node("Mul", [silu, up], f"{p}/swiglu"),
            f"{p}.mlp.down_proj",
            cfg.intermediate,
            cfg.hidden,
        )
        x = node("Add", [x, down], f"{p}/out")
    linear(rms_norm(x, "norm"), "lm_head", cfg.hidden, cfg.vocab)
    nodes[-1].output[0] = "logits"
    w.file.close()
    graph = helper.make_graph(
        nodes,
        "decoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [
            helper.make_tensor_value_info(
                "logits", TensorProto.FLOAT, ["batch", "sequence", cfg.vocab]
            )
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for field in dataclasses.fields(Config):
        ap.add_argument(f"--{field.name}", type=int, default=field.default)
    ap.add_argument("--out", type=Path, default=cache_dir() / "decoder" / "decoder.onnx")
    args = ap.parse_args()
    cfg = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    path = build(cfg, args.out)
    size = path.stat().st_size + path.with_name(path.name + ".data").stat().st_size
    print(f"{path}: {size / 1e9:.2f} GB, {cfg}")


if __name__ == "__main__":
    main()
