from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Property tests (tests/test_properties.py): "ci" is the default, fast and derandomized so CI is
# reproducible; "long" for local runs: pytest --hypothesis-profile=long
_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile(
    "ci",
    max_examples=6,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=_SLOW_OK,
)
settings.register_profile(
    "long", max_examples=200, deadline=None, print_blob=True, suppress_health_check=_SLOW_OK
)
settings.load_profile("ci")

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "models" / "fixtures"


@pytest.fixture(scope="session")
def digits_model() -> Path:
    return FIXTURES / "digits_cnn.onnx"


@pytest.fixture(scope="session")
def digits_calib() -> Path:
    return FIXTURES / "digits_calib.npz"


@pytest.fixture(scope="session")
def digits_test() -> tuple[np.ndarray, np.ndarray]:
    with np.load(FIXTURES / "digits_test.npz") as z:
        x = z["input"]
    return x, np.load(FIXTURES / "digits_test_labels.npy")


@pytest.fixture(scope="session")
def mobilenet() -> dict[str, Path]:
    """MobileNetV2 with ImageNet weights (built once into the cache; needs torch)."""
    if not os.environ.get("CI"):
        pytest.importorskip("torch")  # locally without torch: skip; in CI: fail loudly
    from models import mobilenet_v2

    return mobilenet_v2.build()


@pytest.fixture(scope="session")
def photos() -> dict[str, Path]:
    from models import photos

    return photos.build()


@pytest.fixture(scope="session")
def minilm() -> dict[str, Path]:
    """all-MiniLM-L6-v2 with its real weights and the sentence sets (built once; needs torch)."""
    if not os.environ.get("CI"):
        pytest.importorskip("torch")
    from models import minilm

    return minilm.build()


def pytest_terminal_summary(terminalreporter):
    """After a zoo run (pytest -m zoo): what each pass did on the third-party models."""
    import sys

    zoo_test = sys.modules.get("tests.test_zoo")
    if zoo_test is None or not getattr(zoo_test, "RESULTS", None):
        return
    from models.zoo import table

    terminalreporter.section("zoo: what each pass did (models/zoo.py)")
    terminalreporter.write_line(table(zoo_test.RESULTS))
