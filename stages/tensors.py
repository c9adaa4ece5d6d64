"""Tensor specs and the arrays that fill them: shared by data, export and validate."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import ModelError


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: list  # ints are fixed, strings name dynamic axes

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


@dataclass(frozen=True)
class ModelSpec:
    inputs: list[TensorSpec]
    outputs: list[str] | None

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"inputs": [asdict(t) for t in self.inputs], "outputs": self.outputs}, indent=2))

    @classmethod
    def load(cls, path: Path) -> "ModelSpec":
        data = json.loads(path.read_text())
        return cls([TensorSpec(**t) for t in data["inputs"]], data["outputs"])

    @property
    def batch_axis_named(self) -> bool:
        """True when every input's first axis is dynamic (so batches can be built by stacking samples)."""
        return all(t.shape and isinstance(t.shape[0], str) for t in self.inputs)


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    # Written under the final name inside a step's private folder, which is committed atomically.
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def check_feeds(spec: ModelSpec, feeds: dict[str, np.ndarray], origin: str) -> None:
    """Every declared input present with its dtype and rank, fixed sizes matching; names what is wrong."""
    for tensor in spec.inputs:
        if tensor.name not in feeds:
            raise ModelError(f"{origin}: tensor '{tensor.name}' is missing (has: {', '.join(feeds) or 'nothing'})")
        array = feeds[tensor.name]
        if array.ndim != len(tensor.shape):
            raise ModelError(
                f"{origin}: tensor '{tensor.name}' has rank {array.ndim}, expected {len(tensor.shape)} "
                f"(shape {tensor.shape})"
            )
        for axis, dim in enumerate(tensor.shape):
            if isinstance(dim, int) and array.shape[axis] != dim:
                raise ModelError(
                    f"{origin}: tensor '{tensor.name}' axis {axis} is {array.shape[axis]}, expected {dim}"
                )


def resize_axis(array: np.ndarray, axis: int, size: int) -> np.ndarray:
    """Take the first `size` entries along axis, repeating the array when it is shorter."""
    have = array.shape[axis]
    if size <= have:
        return np.take(array, np.arange(size), axis=axis)
    reps = -(-size // have)
    tiled = np.concatenate([array] * reps, axis=axis)
    return np.take(tiled, np.arange(size), axis=axis)


def resize_axes(spec: ModelSpec, feeds: dict[str, np.ndarray], sizes: dict[str, int]) -> dict[str, np.ndarray]:
    """Feeds with each named dynamic axis set to sizes[name] (axes not in sizes keep their size)."""
    out = {}
    for tensor in spec.inputs:
        array = feeds[tensor.name]
        for axis, dim in tensor.dynamic_axes().items():
            if dim in sizes:
                array = resize_axis(array, axis, sizes[dim])
        out[tensor.name] = np.ascontiguousarray(array)
    return out


def axis_sizes(spec: ModelSpec, feeds: dict[str, np.ndarray]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for tensor in spec.inputs:
        for axis, dim in tensor.dynamic_axes().items():
            sizes.setdefault(dim, int(feeds[tensor.name].shape[axis]))
    return sizes


def batch_of(spec: ModelSpec, feeds: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """A batch of `batch` samples built from the validation samples (repeating them when there are fewer)."""
    if not spec.batch_axis_named:
        fixed = {t.shape[0] for t in spec.inputs if t.shape}
        if fixed == {batch}:  # the one batch size the model takes: the samples as they are
            return feeds
        sizes = ", ".join(str(size) for size in sorted(fixed, key=str))
        raise ModelError(f"validation.latency.batch_sizes: the model's first axis is fixed at {sizes}, "
                         f"so a batch of {batch} cannot be built")
    return resize_axes(spec, feeds, {t.shape[0]: batch for t in spec.inputs})


CHUNK = 64  # samples per call when computing parity outputs


def chunked_outputs(run, spec: ModelSpec, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """run(feeds) -> outputs over all samples, CHUNK samples per call when the batch axis is named."""
    count = next(iter(feeds.values())).shape[0]
    step = CHUNK if spec.batch_axis_named else count
    parts = [run({k: v[s : s + step] for k, v in feeds.items()}) for s in range(0, count, step)]
    return [np.concatenate(pieces, axis=0) if len(parts) > 1 else pieces[0] for pieces in zip(*parts)]
