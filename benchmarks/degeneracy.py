"""Whether the benchmark's random-weight CNNs give outputs that parity can measure (not a timing run): for
ResNet-50 and Keras MobileNetV2, untouched (BatchNorm statistics as initialized) and as benchmarks/zoo.py builds
them (statistics from one batch), on 16 validation samples: how much the output varies between inputs, how many
distinct argmax classes there are, and kiln's verdict on the original as a parity reference.

    .venv/bin/python benchmarks/degeneracy.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import zoo  # noqa: E402
from stages import parity  # noqa: E402

SAMPLES = 16


def _torch_outputs(model, images: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(images)).numpy()


def _keras_outputs(model, images: np.ndarray) -> np.ndarray:
    return np.asarray(model([images], training=False))


def measure(name: str, outputs: np.ndarray) -> str:
    measured = parity.compare(outputs, outputs)
    why = parity.degenerate(measured) or "a usable parity reference"
    return (f"{name}: variation {measured['variation']:.3g}, "
            f"{len(np.unique(outputs.argmax(axis=-1)))} distinct argmax of {len(outputs)}; {why}")


def main() -> None:
    images = zoo.resnet50_images(SAMPLES, seed=0)
    calibration = zoo.resnet50_images(zoo.CALIBRATION_BATCH, seed=1)
    model = zoo.resnet50_untouched()
    print(measure("resnet50 untouched", _torch_outputs(model, images)))
    print(measure("resnet50 zoo", _torch_outputs(zoo.torch_batchnorm_from_data(model, calibration), images)))
    images = zoo.mobilenet_v2_images(SAMPLES, seed=0)
    calibration = zoo.mobilenet_v2_images(zoo.CALIBRATION_BATCH, seed=1)
    model = zoo.mobilenet_v2_untouched()
    print(measure("mobilenet-v2 untouched", _keras_outputs(model, images)))
    print(measure("mobilenet-v2 zoo", _keras_outputs(zoo.keras_batchnorm_from_data(model, calibration), images)))


if __name__ == "__main__":
    main()
