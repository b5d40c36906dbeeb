"""Golden outputs: SHA-256 of what each lossy pass writes on two small models, recorded once.

A refactoring that claims "same outputs, byte for byte" (issue 20: quantization split into small
passes) is checked against hashes written *before* it by the code it replaces. The bytes depend
on float rounding, so the hashes are keyed by what decides it on this machine: onnxruntime's MLAS
float kernels (AVX-512 or AVX2), numpy's SIMD target and OpenBLAS's kernel family. A machine of
another kind has no hashes to compare with; record them there from the commit before the change:

    git worktree add /tmp/before <commit> && cd /tmp/before && python tests/golden.py --record
    # then copy the new key of tests/golden.json back

Under QEMU (``qemu-x86_64 -cpu Haswell .venv/bin/python tests/golden.py --record``) the AVX2 key
is recorded on any x86 machine.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HASHES = Path(__file__).with_name("golden.json")

# (case name, pass spec): every case runs on both models
CASES = (
    ("quantize", "quantize"),
    ("quantize-min-fidelity", "quantize:min-fidelity=0.99999,max-float=2"),
    ("cluster", "cluster"),
    ("prune", "prune:ratio=0.3"),
    ("lowrank", "lowrank"),
    ("tucker", "tucker"),
)


def machine_key() -> str:
    """What decides float rounding here: MLAS family / numpy SIMD target / OpenBLAS kernels."""
    import threadpoolctl
    from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__

    from onnxshrink import cpu

    mlas = "avx512" if "avx512f" in cpu.this_cpu().flags else "avx2"
    simd = ([t for t in __cpu_dispatch__ if __cpu_features__.get(t)] or ["baseline"])[-1]
    blas = sorted(
        {
            str(i.get("architecture"))
            for i in threadpoolctl.threadpool_info()
            if i.get("internal_api") == "openblas"
        }
    ) or ["none"]
    return f"{mlas}/{simd}/{'+'.join(blas)}"


def models() -> dict[str, tuple[onnx.ModelProto, dict[str, np.ndarray]]]:
    """The digits CNN with its calibration digits; a small ResNet-18-style net, seeded inputs."""
    from models import resnet

    fixtures = ROOT / "models" / "fixtures"
    with np.load(fixtures / "digits_calib.npz") as z:
        digits = {k: z[k] for k in z.files}
    net = resnet.build(width=16, image=32, classes=10)
    rng = np.random.default_rng(7)
    feeds = {net.graph.input[0].name: rng.standard_normal((48, 3, 32, 32)).astype(np.float32)}
    return {"digits": (onnx.load(fixtures / "digits_cnn.onnx"), digits), "resnet": (net, feeds)}


def outputs(cases: set[str] | None = None) -> dict[str, str]:
    """case -> "sha256 status" of the model ``compress`` returns for it (``cases``: only those)."""
    from onnxshrink import compress

    found = {}
    for mname, (model, data) in models().items():
        for case, spec in CASES:
            if cases is not None and case not in cases:
                continue
            out, report = compress(model, [spec], data=dict(data))
            proto = out if isinstance(out, onnx.ModelProto) else onnx.load(out)
            digest = hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()
            found[f"{mname}/{case}"] = f"{digest} {report.passes[-1].status}"
    return found


def main() -> None:
    if "--record" not in sys.argv:
        raise SystemExit("usage: python tests/golden.py --record [CASE ...]")
    table = json.loads(HASHES.read_text()) if HASHES.exists() else {}
    key = machine_key()
    cases = {a for a in sys.argv[1:] if a != "--record"} or None  # re-record only these
    table[key] = {**table.get(key, {}), **outputs(cases)}
    HASHES.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"recorded {len(table[key])} outputs for {key}")


if __name__ == "__main__":
    main()
