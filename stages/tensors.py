"""Tensor specs and the arrays that fill them: shared by data, export and validate."""

from __future__ import annotations

import json
import zipfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import DataError, ModelError, first_line

MAX_DATA_BYTES = 1 << 30  # validation samples are held in memory several times over: 1 GiB of them at most


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


def read_npz(path: Path, origin: str) -> dict[str, np.ndarray]:
    """A user's .npz file, every array in it, or a DataError that says what the file is instead: not a zip
    archive (a text file, a lone .npy), truncated or corrupt, Python objects inside, or more than fits in memory."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(6)
    except OSError as exc:
        raise DataError(f"{origin}: cannot read the file ({exc.strerror})") from None
    if head.startswith(b"\x93NUMPY"):
        raise DataError(f"{origin}: a .npy file (one unnamed array); save the inputs by name with np.savez")
    if not head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        raise DataError(f"{origin}: not an .npz file (no zip archive; it starts with {head!r})")
    try:
        with zipfile.ZipFile(path) as archive:
            size = sum(info.file_size for info in archive.infolist())
        if size > MAX_DATA_BYTES:
            raise DataError(f"{origin}: the arrays take {size / 2**30:.1f} GiB uncompressed; kiln validates on at most "
                            f"{MAX_DATA_BYTES / 2**30:.0f} GiB of samples")
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except ValueError as exc:
        if "pickle" in str(exc):
            raise DataError(f"{origin}: an array holds Python objects (pickled); only plain numeric arrays are read") from None
        raise DataError(f"{origin}: not a readable .npz file ({first_line(exc, 200)})") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError) as exc:
        raise DataError(f"{origin}: truncated or corrupt .npz file ({type(exc).__name__}: {first_line(exc, 200)})") from None
    except MemoryError:
        raise DataError(f"{origin}: the arrays do not fit in memory") from None
    for name, value in arrays.items():  # a zip member that is not a .npy comes back as its raw bytes
        if not isinstance(value, np.ndarray):
            raise DataError(f"{origin}: member '{name}' of the archive is not a .npy array")
    return arrays


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


def _cast(name: str, array: np.ndarray, want: np.dtype, origin: str) -> tuple[np.ndarray, str | None]:
    """The array as the model's declared dtype when that is a safe cast, with a note when it changes values'
    precision; a DataError otherwise. Safe: the same dtype; another integer width whose range holds every value;
    another float width (narrowing noted, and values that overflow it refused). Never between kinds: an int array
    for a float input, a float array for an int input, complex, strings, objects."""
    have = array.dtype
    if have == want:
        return array, None
    refused = f"{origin}: tensor '{name}' is {have.name}, the model takes {want.name}"
    if have.kind in "iu" and want.kind in "iu":
        if array.size and (array.min() < np.iinfo(want).min or array.max() > np.iinfo(want).max):
            raise DataError(f"{refused} and its values ({array.min()}..{array.max()}) do not fit")
        return array.astype(want), None
    if have.kind == "f" and want.kind == "f":
        with np.errstate(over="ignore"):  # overflow becomes inf, refused just below with the sample that holds it
            cast = array.astype(want)
        _check_finite(name, cast, f"{origin} (as {want.name})")
        narrowed = np.finfo(want).bits < np.finfo(have).bits
        return cast, (f"tensor '{name}': {have.name} data cast to the model's {want.name}" if narrowed else None)
    if have.kind in "cOUSVMm":
        raise DataError(f"{refused}; {_KINDS.get(have.kind, have.kind)} data is never cast")
    raise DataError(f"{refused}; save the data as {want.name} (kiln does not convert between kinds)")


_KINDS = {"c": "complex", "O": "Python object", "U": "string", "S": "bytes", "V": "structured", "M": "datetime",
          "m": "timedelta"}


def _check_finite(name: str, array: np.ndarray, origin: str) -> None:
    if array.dtype.kind not in "fc":
        return
    bad = ~np.isfinite(array)
    if bad.any():
        where = np.argwhere(bad)[0]
        value = array[tuple(where)]
        raise DataError(f"{origin}: tensor '{name}' sample {where[0] if array.ndim else 0} holds {value} "
                        f"({int(bad.sum())} non-finite value(s) in all); validation data must be finite")


def conform(spec: ModelSpec, feeds: dict[str, np.ndarray], origin: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """The feeds checked (rank, fixed sizes, not empty, one sample count, finite) and cast to the declared dtypes
    where that is safe (see _cast); returns them with a note for each cast that narrowed precision."""
    check_feeds(spec, feeds, origin)
    out, notes = {}, []
    for tensor in spec.inputs:
        array = feeds[tensor.name]
        if array.size == 0:
            raise DataError(f"{origin}: tensor '{tensor.name}' is empty (shape {list(array.shape)}); no samples")
        if array.dtype.kind in "fc":
            _check_finite(tensor.name, array, origin)
        out[tensor.name], note = _cast(tensor.name, array, np.dtype(tensor.dtype), origin)
        notes += [note] if note else []
    counts = {t.name: out[t.name].shape[0] for t in spec.inputs if out[t.name].ndim}
    if spec.batch_axis_named and len(set(counts.values())) > 1:
        raise DataError(f"{origin}: the inputs hold different numbers of samples "
                        f"({', '.join(f'{k}: {v}' for k, v in counts.items())})")
    return out, notes


def check_labels(labels: np.ndarray, samples: int, origin: str) -> np.ndarray:
    """Class labels: one integer per sample (at least as many as samples; the first `samples` are used)."""
    if labels.ndim != 1:
        raise DataError(f"{origin}: labels have shape {list(labels.shape)}; expected one class index per sample")
    if labels.shape[0] < samples:
        raise DataError(f"{origin}: {labels.shape[0]} labels for {samples} samples")
    labels = labels[:samples]
    if labels.dtype.kind in "iub":
        return labels
    if labels.dtype.kind == "f" and np.isfinite(labels).all() and (labels == np.round(labels)).all():
        return labels.astype(np.int64)
    raise DataError(f"{origin}: labels are {labels.dtype.name}{' with non-integer values' if labels.dtype.kind == 'f' else ''}; "
                    "expected integer class indices")


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
