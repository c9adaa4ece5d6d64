"""What stages hand each other, named once: the artifact kinds a step's `out/` folder can hold, and typed readers
and writers for their files. No stage opens another stage's files by name; it calls these.

A kind is a plain string, so the engine can check that a step's inputs are wired to steps that produce what the
stage declares (`INPUTS` / `OUTPUT` in each stage module) without knowing what the files are.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import RecipeError
from stages.tensors import ModelSpec, load_arrays, save_arrays

# The kinds, and the files each holds (besides any a stage adds for its own report).
SOURCE = "source"  # fetch: source.json (flavor, uri, signature, ...) and model/ (the MLflow model as downloaded)
SAMPLES = "samples"  # data: spec.json, inputs.npz, labels.npz (when the data has labels)
ONNX = "onnx"  # model.onnx (+ model.onnx.data for a large model, see save_onnx); export may add fusion_hint.json,
#                optimize adds quantizable.onnx, quantize/olive add quantize.json, tune adds tune.json and
#                session_config.json
METRICS = "metrics"  # validate: metrics.json, reference.npz, candidate.npz, sweep.npz
VERDICTS = "verdicts"  # gate: verdicts.json
SERVING = "serving"  # serve.<target>: the target's files, or SKIPPED with the reason
BUNDLE = "bundle"  # publish: the hand-off bundle (manifest.json, model.onnx, reports, ...)
REGISTERED = "registered"  # register: registered.json

KINDS = (SOURCE, SAMPLES, ONNX, METRICS, VERDICTS, SERVING, BUNDLE, REGISTERED)


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _optional_json(path: Path) -> Any | None:
    return json.loads(path.read_text()) if path.exists() else None


def write_json(path: Path, value: Any, **options: Any) -> None:
    """Inside a step's private folder (committed atomically by the store), so a plain write is enough."""
    path.write_text(json.dumps(value, indent=2, **options))


# --- SOURCE (fetch) -----------------------------------------------------------------------------------------------

def source(folder: Path) -> dict:
    """fetch's description of the model: uri, name, version, run_id, flavor, signature, input_example, ..."""
    return _json(folder / "source.json")


def write_source(out: Path, description: dict) -> None:
    write_json(out / "source.json", description)


def model_dir(folder: Path) -> Path:
    """The MLflow model folder as downloaded (MLmodel and the flavor's files)."""
    return folder / "model"


def flavor(folder: Path) -> str | None:
    """The flavor fetch recorded, or None when the folder holds no source yet."""
    try:
        return source(folder)["flavor"]
    except (OSError, KeyError, ValueError):
        return None


# --- SAMPLES (data) -----------------------------------------------------------------------------------------------

def spec(folder: Path) -> ModelSpec:
    return ModelSpec.load(folder / "spec.json")


def inputs(folder: Path) -> dict[str, np.ndarray]:
    return load_arrays(folder / "inputs.npz")


def labels(folder: Path) -> np.ndarray | None:
    path = folder / "labels.npz"
    return load_arrays(path)["labels"] if path.exists() else None


def write_samples(out: Path, model_spec: ModelSpec, arrays: dict[str, np.ndarray], label_array: np.ndarray | None) -> None:
    save_arrays(out / "inputs.npz", arrays)
    if label_array is not None:
        save_arrays(out / "labels.npz", {"labels": label_array})
    model_spec.save(out / "spec.json")


# --- ONNX (export, optimize, quantize, olive, tune) -----------------------------------------------------------------

def onnx_model(folder: Path) -> Path:
    return folder / "model.onnx"


def fusion_hint(folder: Path) -> dict | None:
    """export's transformer fusion settings from the model's config ({model_type, num_heads, hidden_size, from}),
    or None: optimize uses them when the recipe names none."""
    return _optional_json(folder / "fusion_hint.json")


def write_fusion_hint(out: Path, hint: dict) -> None:
    write_json(out / "fusion_hint.json", hint)


# An ONNX artifact is `<name>.onnx` plus, when it is too large for one protobuf, its initializers in one file
# beside it, `<name>.onnx.data` (the name torch.onnx, onnxruntime.quantization and onnxruntime.transformers all
# write), referenced by a relative `location` inside the same folder. Every ONNX writer ends with
# settle_onnx(path), so the layout follows one rule: external data exactly when the model is larger than
# external_data_bytes().
EXTERNAL_DATA_BYTES = 2**31 - 2**28  # 1.75 GiB: protobuf caps a ModelProto at 2 GiB; the margin leaves room
#                                      for the graph itself and for a step that grows the model a little
EXTERNAL_DATA_ENV = "KILN_EXTERNAL_DATA_BYTES"  # kiln-wide override (e.g. a small value to test the path)
EXTERNAL_TENSOR_BYTES = 1024  # tensors smaller than this stay inside model.onnx (ONNX's own default)


def external_data_bytes() -> int:
    """The size above which ONNX models are written with external data: $KILN_EXTERNAL_DATA_BYTES or the
    default. Read in every process that writes ONNX (the runner and its workers share the environment)."""
    value = os.environ.get(EXTERNAL_DATA_ENV, "").strip()
    if not value:
        return EXTERNAL_DATA_BYTES
    try:
        chosen = int(value)
    except ValueError:
        raise RecipeError(f"${EXTERNAL_DATA_ENV}: {value!r} is not a number of bytes") from None
    if not 0 < chosen <= EXTERNAL_DATA_BYTES:
        raise RecipeError(f"${EXTERNAL_DATA_ENV}: {chosen} is outside 1..{EXTERNAL_DATA_BYTES} bytes")
    return chosen


def layout_key(kind: str) -> dict:
    """What a step that writes `kind` adds to its cache key: the external-data threshold when it is not the
    default (so keys built without the override stay as they were, and an entry built under another threshold,
    with another file layout, is never reused)."""
    chosen = external_data_bytes()
    return {"onnx_external_data_bytes": chosen} if kind == ONNX and chosen != EXTERNAL_DATA_BYTES else {}


def data_file(model: Path) -> Path:
    """Where kiln keeps a model's external data: `<model file name>.data` beside it."""
    return model.with_name(model.name + ".data")


def onnx_files(model: Path) -> list[Path]:
    """The files one ONNX artifact is made of: the model and, when it has one, its data file."""
    return [model, *([data_file(model)] if data_file(model).exists() else [])]


def onnx_bytes(model: Path) -> int:
    """The artifact's size on disk, data file included."""
    return sum(path.stat().st_size for path in onnx_files(model))


def remove_onnx(model: Path) -> None:
    for path in onnx_files(model):
        path.unlink()


def copy_onnx(source: Path, target: Path) -> None:
    """Copy an ONNX artifact (its data file too) to target, which keeps the source's file name: the model
    refers to its data file by name."""
    if source.name != target.name:
        raise ValueError(f"copy_onnx: {source.name} would lose its data file's name as {target.name}")
    for path in onnx_files(source):
        shutil.copyfile(path, target.with_name(path.name))


def _locations(proto) -> set[str]:
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    return {ExternalDataInfo(t).location for t in _get_all_tensors(proto) if uses_external_data(t)}


def _proto_bytes(proto) -> int:
    """The serialized size; protobuf cannot even measure a message over 2 GiB (EncodeError), which is as good
    an answer."""
    from google.protobuf.message import EncodeError

    try:
        return proto.ByteSize()
    except EncodeError:
        return 2**31


def has_external_data(path: Path) -> bool:
    return bool(_locations(load_graph(path)))


def save_onnx(proto, path: Path) -> None:
    """Write a fully loaded ModelProto in kiln's layout (external data above the threshold). A data file left
    by an earlier write is removed first: ONNX appends to an existing one."""
    import onnx

    data_file(path).unlink(missing_ok=True)
    if _proto_bytes(proto) > external_data_bytes():
        onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=data_file(path).name, size_threshold=EXTERNAL_TENSOR_BYTES)
    else:
        onnx.save(proto, str(path))


def settle_onnx(path: Path) -> bool:
    """Bring a model that a tool wrote (inline, one data file, or a file per tensor) to kiln's layout; True when
    it has external data. Rewrites only what does not already follow the rule."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False)
    found = _locations(graph)
    external = onnx_bytes(path) + sum((path.parent / name).stat().st_size for name in found
                                      if name != data_file(path).name) > external_data_bytes()
    if found == ({data_file(path).name} if external else set()):
        return external
    onnx.load_external_data_for_model(graph, str(path.parent))
    for name in found:
        (path.parent / name).unlink()
    save_onnx(graph, path)
    return data_file(path).exists()


def data_file_name(model: Path) -> str | None:
    """The name of the model's data file, or None for a self-contained model (what manifests and summaries say)."""
    return data_file(model).name if data_file(model).exists() else None


def op_counts(path: Path) -> Counter:
    """How many nodes of each operator type the graph at path has (its weights are not read)."""
    return Counter(node.op_type for node in load_graph(path).graph.node)


def load_graph(path: Path):
    """The ModelProto without its external data: enough to read or edit the graph, and saving it back with
    onnx.save keeps the references to the data file (which stays as it is)."""
    import onnx

    return onnx.load(str(path), load_external_data=False)


def quantizable(folder: Path) -> Path:
    """optimize's copy at the basic level, which precision variants start from (fused CPU kernels don't quantize)."""
    return folder / "quantizable.onnx"


def quantize_record(folder: Path) -> dict | None:
    """A precision variant's record (kind, fallback rounds, calibration hash), or None for an FP32 model."""
    return _optional_json(folder / "quantize.json")


def write_quantize_record(out: Path, record: dict) -> None:
    write_json(out / "quantize.json", record)


def tune_record(folder: Path) -> dict | None:
    """A tune step's record (candidates, trials, winner), or None for a model that was not tuned."""
    return _optional_json(folder / "tune.json")


def write_tune_record(out: Path, record: dict) -> None:
    write_json(out / "tune.json", record)


def session_config(folder: Path) -> dict | None:
    """The ONNX Runtime settings a tuned model won with, or None."""
    return _optional_json(folder / "session_config.json")


def write_session_config(out: Path, settings: dict) -> None:
    write_json(out / "session_config.json", settings)


# --- METRICS (validate) -------------------------------------------------------------------------------------------

def metrics(folder: Path) -> dict:
    return _json(folder / "metrics.json")


def reference(folder: Path) -> dict[str, np.ndarray]:
    """The original framework's outputs on the validation samples, by ONNX output name."""
    return load_arrays(folder / "reference.npz")


def candidate(folder: Path) -> dict[str, np.ndarray]:
    """The ONNX model's outputs on the same samples."""
    return load_arrays(folder / "candidate.npz")


def sweep(folder: Path) -> dict[str, np.ndarray]:
    """Outputs at other sizes of the dynamic axes: '<trial>/reference/<output>' and '<trial>/candidate/<output>'."""
    path = folder / "sweep.npz"
    return load_arrays(path) if path.exists() else {}


def write_outputs(out: Path, reference_arrays: dict[str, np.ndarray], candidate_arrays: dict[str, np.ndarray]) -> None:
    save_arrays(out / "reference.npz", reference_arrays)
    save_arrays(out / "candidate.npz", candidate_arrays)


def write_sweep(out: Path, arrays: dict[str, np.ndarray]) -> None:
    save_arrays(out / "sweep.npz", arrays)


def write_metrics(out: Path, value: dict) -> None:
    write_json(out / "metrics.json", value)


# --- VERDICTS (gate) ----------------------------------------------------------------------------------------------

def verdicts(folder: Path) -> dict:
    return _json(folder / "verdicts.json")


def write_verdicts(out: Path, value: dict) -> None:
    write_json(out / "verdicts.json", value)


# --- SERVING (serve.<target>) ---------------------------------------------------------------------------------------

def skipped(folder: Path) -> str | None:
    path = folder / "SKIPPED"
    return path.read_text().strip() if path.exists() else None


def write_skipped(out: Path, reason: str) -> None:
    (out / "SKIPPED").write_text(reason + "\n")


# --- BUNDLE (publish) and REGISTERED (register) ---------------------------------------------------------------------

def manifest_file(folder: Path) -> Path:
    """The bundle's manifest.json, which holds every file's sha256 (so its own sha256 names the bundle)."""
    return folder / "manifest.json"


def manifest(folder: Path) -> dict:
    return _json(manifest_file(folder))


def write_registered(out: Path, record: dict) -> None:
    write_json(out / "registered.json", record)
