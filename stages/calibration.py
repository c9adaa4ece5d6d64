"""Calibration data for precision variants: samples drawn from the validation inputs with the recipe's seed
(their hash recorded, so the same seed and data give the same model), and a reader that hands them to ONNX
Runtime's static quantizer one sample at a time. Shared by the quantize and olive stages."""

from __future__ import annotations

import hashlib

import numpy as np


class CalibrationReader:
    """Calibration batches of one sample each, in a fixed order."""

    def __init__(self, feeds: dict[str, np.ndarray]):
        count = next(iter(feeds.values())).shape[0]
        self.items = [{k: v[i : i + 1] for k, v in feeds.items()} for i in range(count)]
        self.position = 0

    def get_next(self):
        if self.position >= len(self.items):
            return None
        self.position += 1
        return self.items[self.position - 1]

    def rewind(self):
        self.position = 0


def sample_rows(count: int, samples: int, seed: int) -> np.ndarray:
    """`samples` of `count` row indices, chosen with `seed`, in order."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(count, size=min(samples, count), replace=False))


def draw_samples(feeds: dict[str, np.ndarray], samples: int, seed: int) -> tuple[dict[str, np.ndarray], str]:
    """`samples` rows of the feeds, chosen with `seed` and kept in order, and the sha256 of what was chosen."""
    rows = sample_rows(next(iter(feeds.values())).shape[0], samples, seed)
    chosen = {k: np.ascontiguousarray(v[rows]) for k, v in feeds.items()}
    digest = hashlib.sha256()
    for name in sorted(chosen):
        digest.update(name.encode())
        digest.update(chosen[name].tobytes())
    return chosen, digest.hexdigest()
