"""A small ResNet-style CNN trained on scikit-learn's ``load_digits``, exported to ONNX.

Real labelled data, no download: the 1,797 8×8 digit images are upsampled to 32×32 (bilinear),
scaled to [-0.5, 0.5], split by a seeded stratified shuffle into 1,397 training and 400 test
images. The network has residual Adds, depthwise convolutions and BatchNorm (kept as nodes in
the export, for ``fold-batchnorm``), a GlobalAveragePool and a Flatten -> Gemm head:

    stem   Conv3x3 1->16, BN, ReLU                                   32×32
    res1   [Conv3x3 16->16, BN, ReLU, Conv3x3 16->16, BN] + x, ReLU
    down1  Conv3x3 s2 16->32, BN, ReLU                               16×16
    dw1    [DWConv3x3 32, BN, ReLU, Conv1x1 32->32, BN] + x, ReLU
    down2  Conv3x3 s2 32->64, BN, ReLU                               8×8
    res2   [Conv3x3 64->64, BN, ReLU, Conv3x3 64->64, BN] + x, ReLU
    dw2    [DWConv3x3 64, BN, ReLU, Conv1x1 64->64, BN] + x, ReLU
    head   GlobalAveragePool, Flatten, Gemm 64->10

Writes (committed, small): ``fixtures/digits_cnn.onnx``, ``fixtures/digits_calib.npz`` (200
training images, key ``input``), ``fixtures/digits_test.npz`` (the 400 test images) and
``fixtures/digits_test_labels.npy``.

    python models/digits.py            # trains ~1 min on 2 cores, prints test accuracy
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.common import FIXTURES, export_onnx  # noqa: E402

SEED = 0


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, x_test, y_train, y_test): x as float32 [N, 1, 32, 32] in [-0.5, 0.5]."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False) - 0.5
    x = x.numpy().astype(np.float32)
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=400, stratify=y, random_state=SEED)  # type: ignore[return-value]


def build_net():
    import torch
    from torch import nn

    def cbr(cin, cout, k=3, s=1, groups=1, relu=True):
        layers = [
            nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if relu:
            layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    class Residual(nn.Module):
        def __init__(self, body):
            super().__init__()
            self.body = body

        def forward(self, x):
            return torch.relu(self.body(x) + x)

    return nn.Sequential(
        cbr(1, 16),
        Residual(nn.Sequential(cbr(16, 16), cbr(16, 16, relu=False))),
        cbr(16, 32, s=2),
        Residual(nn.Sequential(cbr(32, 32, groups=32), cbr(32, 32, k=1, relu=False))),
        cbr(32, 64, s=2),
        Residual(nn.Sequential(cbr(64, 64), cbr(64, 64, relu=False))),
        Residual(nn.Sequential(cbr(64, 64, groups=64), cbr(64, 64, k=1, relu=False))),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def train(epochs: int = 40) -> tuple[object, float]:
    import torch
    from torch import nn

    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    x_tr, x_te, y_tr, y_te = load_split()
    net = build_net()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=3e-3, total_steps=epochs * ((len(x_tr) + 63) // 64)
    )
    xt, yt = torch.tensor(x_tr), torch.tensor(y_tr)
    g = torch.Generator().manual_seed(SEED)
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            xb = xt[idx]
            # light augmentation: random shifts of up to 2 pixels
            dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = nn.functional.cross_entropy(net(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        acc = (net(torch.tensor(x_te)).argmax(1).numpy() == y_te).mean()
    return net, float(acc)


def main() -> None:
    import torch

    net, acc = train()
    print(f"digits CNN: test accuracy {acc:.4f} on 400 held-out images")
    if acc < 0.98:
        raise SystemExit(f"accuracy {acc:.4f} below 0.98: not exporting")
    x_tr, x_te, y_tr, y_te = load_split()
    FIXTURES.mkdir(exist_ok=True)
    export_onnx(net, torch.tensor(x_te[:1]), FIXTURES / "digits_cnn.onnx", keep_batchnorm=True)
    rng = np.random.default_rng(SEED)
    calib = x_tr[rng.choice(len(x_tr), 200, replace=False)]
    np.savez_compressed(FIXTURES / "digits_calib.npz", input=calib)
    np.savez_compressed(FIXTURES / "digits_test.npz", input=x_te)
    np.save(FIXTURES / "digits_test_labels.npy", y_te)
    print(
        f"wrote {FIXTURES}/digits_cnn.onnx, digits_calib.npz, digits_test.npz, "
        "digits_test_labels.npy"
    )


if __name__ == "__main__":
    main()
