"""olive: a precision variant built by Olive passes (olive-ai), named and configured exactly as Olive defines them,
run on the same input the other variants take (the optimized FP32 graph at the basic level), in this process, offline.

Olive runs through its Python API (`olive.workflows.run` with a config dict) on the local ONNX file, in a temporary
folder inside the step's private build folder, with telemetry off. Passes that take calibration data get kiln's
validation samples (the recipe's inputs, drawn with the variant's `calibration` seed and count, hash recorded)
through a dataset registered with Olive's data registry under `DATASET`, as the data config `CALIBRATION`; a pass
config may name it itself (`data_config: kiln_calibration`). Unknown pass parameters are errors here (Olive only warns
and ignores them). The result is optimized offline at the recipe's level like every variant, so it runs as validated.

Outputs, in the layout the quantize stage gives validate/gate/publish: `model.onnx`, `quantize.json` (the variant
record) and `olive.json` (Olive's version, each pass with its resolved config and what it changed in the graph).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.errors import ModelError
from pipeline.schema import StageConfig, Strict
from pipeline.versions import onnxruntime_distribution, version_of
from stages import artifacts, onnx_runtime
from stages.calibration import draw_samples
from stages.optimize import Level
from stages.quantize import Calibration, VariantBase
from stages.tensors import load_arrays, save_arrays

VERSION = 2
DISTRIBUTION = "olive-ai"
CALIBRATION = "kiln_calibration"  # the data config name passes refer to
DATASET = "kiln_samples"  # the dataset type registered with Olive's data registry
OFFLINE = {"OLIVE_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "true", "HF_HUB_OFFLINE": "1"}


def tools(config: Config, inputs: dict[str, Path]) -> list[str]:
    # torch: Olive batches calibration samples with torch's DataLoader.
    return [DISTRIBUTION, "onnx", onnxruntime_distribution(), "numpy", "torch"]


@lru_cache(maxsize=1)
def known_passes() -> dict[str, dict] | None:
    """Olive's pass registry (lower-case name -> entry) from its installed `olive_config.json`, without importing
    Olive (seconds); None when olive-ai is not installed."""
    from importlib import metadata

    try:
        registry = metadata.distribution(DISTRIBUTION).locate_file("olive/olive_config.json")
        passes = json.loads(Path(str(registry)).read_text())["passes"]
    except (metadata.PackageNotFoundError, OSError, KeyError, ValueError):
        return None
    return {name.lower(): {"name": name, **entry} for name, entry in passes.items()}


class OlivePass(Strict):
    """One Olive pass, named and configured exactly as Olive defines it (e.g. OnnxStaticQuantization)."""

    type: str = Field(min_length=1, description="Olive pass name, e.g. OnnxDynamicQuantization")
    config: dict[str, Any] = Field(default_factory=dict, description="The pass's parameters as Olive names them")


class OliveVariant(VariantBase):
    """A precision variant built by Olive passes instead of kiln's quantizer."""

    kind: Literal["olive"]
    passes: list[OlivePass] | None = Field(
        None, description="Olive passes run in order; static quantization calibrates on `calibration` samples"
    )
    calibration: Calibration = Field(default_factory=Calibration)

    @model_validator(mode="after")
    def _passes_given(self) -> "OliveVariant":
        if not self.passes:
            raise ValueError("passes: kind olive needs a non-empty list of {type: <OlivePassName>, config: {...}}")
        return self

    def problems(self) -> list[str]:
        """Pass names Olive would reject, as 'passes[i].type: why' (checked with the recipe, before any step)."""
        return [f"passes[{i}].type: {why}" for i, step in enumerate(self.passes or []) if (why := unknown_pass(step.type))]


VARIANTS = {"olive": OliveVariant}


class Config(StageConfig):
    variant: OliveVariant
    level: Level


INPUTS = {"onnx": artifacts.ONNX, "data": artifacts.SAMPLES}
OUTPUT = artifacts.ONNX


def unknown_pass(name: str) -> str | None:
    """Why Olive would reject this pass name, or None (also None when olive-ai is not installed: the step says)."""
    passes = known_passes()
    if passes is None or name.lower() in passes:
        return None
    import difflib

    close = difflib.get_close_matches(name.lower(), passes, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(passes[c]['name'] for c in close)}?" if close else ""
    return f"{name!r} is not an Olive pass (olive-ai {version_of(DISTRIBUTION)}){hint}"


def _graph_change(before: Path, after: Path) -> dict:
    """What a pass did to the graph: node counts, op types added/removed (by count), size."""
    old, new = artifacts.op_counts(before), artifacts.op_counts(after)
    return {
        "nodes_before": sum(old.values()),
        "nodes_after": sum(new.values()),
        "ops_added": dict(sorted((new - old).items())),
        "ops_removed": dict(sorted((old - new).items())),
        "bytes": artifacts.onnx_bytes(after),
    }


def _onnx_file(model_config: dict) -> Path:
    config = (model_config or {}).get("config") or {}
    path = Path(config.get("model_path") or "")
    if path.is_dir():
        named = path / (config.get("onnx_file_name") or "model.onnx")
        path = named if named.is_file() else next(iter(sorted(path.glob("*.onnx"))), named)
    return path


def _one_line(exc: BaseException) -> str:
    """The exception and its root cause, on one line."""
    root = exc
    while root.__cause__ is not None or (root.__context__ is not None and not root.__suppress_context__):
        root = root.__cause__ or root.__context__
    text = f"{type(exc).__name__}: {str(exc).strip()}"
    if root is not exc:
        text += f" ({type(root).__name__}: {str(root).strip()})"
    return " ".join(text.split())[:400]


class _Errors(logging.Handler):
    """Keeps the exceptions Olive logs (it logs a failed pass and carries on with no output model)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.exceptions: list[BaseException] = []
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.exceptions.append(record.exc_info[1])
        self.messages.append(record.getMessage())


class _Samples:
    """Kiln's calibration samples as an Olive dataset: item i is ({input: sample i}, label 0); Olive's default
    dataloader batches them (batch_size 1) for ONNX Runtime's calibrator."""

    def __init__(self, path: str):
        self.arrays = load_arrays(Path(path))
        self.count = next(iter(self.arrays.values())).shape[0]

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        return {k: v[index] for k, v in self.arrays.items()}, 0


def _samples(path: str, **_) -> _Samples:
    return _Samples(path)


def _checked_passes(passes: list[dict], field: str) -> list[dict]:
    """Each pass's config checked against the pass's own parameters (Olive ignores unknown ones with a warning);
    the calibration data config is filled in for passes that take one. Errors name `<field>.passes[i]`."""
    from olive.hardware.accelerator import AcceleratorSpec, Device
    from olive.package_config import OlivePackageConfig

    spec = AcceleratorSpec(accelerator_type=Device.CPU, execution_provider="CPUExecutionProvider")
    package = OlivePackageConfig.load_default_config()
    checked = []
    for index, olive_pass in enumerate(passes):
        where = f"{field}.passes[{index}]"
        try:
            pass_class = package.import_pass_module(olive_pass["type"])
            parameters = pass_class.default_config(spec)
        except Exception as exc:  # noqa: BLE001 - Olive's rejection, named by the recipe field
            raise ModelError(f"{where}.type: Olive cannot load pass {olive_pass['type']!r}: {_one_line(exc)}") from None
        config = dict(olive_pass.get("config") or {})
        unknown = sorted(set(config) - set(parameters))
        if unknown:
            raise ModelError(f"{where}.config.{unknown[0]}: not a parameter of Olive's {pass_class.__name__} "
                             f"(olive-ai {version_of(DISTRIBUTION)}; it takes: {', '.join(sorted(parameters))})")
        if "data_config" in parameters and not config.get("data_config"):
            config["data_config"] = CALIBRATION
        checked.append({"type": olive_pass["type"], "config": config})
    return checked


def _workflow(source: Path, passes: list[dict], npz: Path, work: Path) -> dict:
    return {
        "input_model": {"type": "ONNXModel", "model_path": str(source)},
        "systems": {"local": {"type": "LocalSystem", "accelerators": [
            {"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}]}},
        "data_configs": [{"name": CALIBRATION, "load_dataset_config": {"type": DATASET, "params": {"path": str(npz)}},
                          "dataloader_config": {"batch_size": 1}}],
        # Olive keeps the order of this mapping; the names only have to be unique.
        "passes": {f"p{index}-{p['type'].lower()}": p for index, p in enumerate(passes)},
        "engine": {"host": "local", "target": "local", "cache_dir": str(work / "cache"),
                   "output_dir": str(work / "output"), "evaluate_input_model": False, "log_severity_level": 3},
    }


def _chain(footprint: dict, source: Path) -> list[dict]:
    """The footprint's models from the input model on, in pass order: [{pass, config, path, seconds, pruned}]."""
    children = {node.get("parent_model_id"): node for node in footprint.values() if node.get("parent_model_id")}
    root = next((n for n in footprint.values() if not n.get("parent_model_id")), None)
    chain, current = [], root
    while current is not None and current["model_id"] in children:
        node = children[current["model_id"]]
        data = node.get("model_config_data") or {}
        pruned = not data or bool(data.get("is_pruned"))
        chain.append({
            "pass": node.get("from_pass"),
            "config": node.get("pass_run_config") or {},
            "path": None if pruned else _onnx_file(data),
            "pruned": pruned,
            "seconds": round(max(0.0, (node.get("end_time") or 0) - (node.get("start_time") or 0)), 3),
        })
        current = node
    return chain


def _portable(config: dict) -> dict:
    """A pass's resolved config without where this run kept things (the record must not depend on temp paths)."""
    out = {}
    for key, value in config.items():
        if key.endswith("data_config") and isinstance(value, dict):
            value = value.get("name")
        out[key] = value
    return out


def _run_olive(source: Path, passes: list[dict], npz: Path, work: Path, field: str) -> tuple[Path, list[dict]]:
    """Run the workflow; the output model and the per-pass chain. Olive's logging goes to a file, not stdout (the
    worker shares the CLI's stdout, which carries `--json`)."""
    from olive.data.registry import Registry
    from olive.workflows import run as olive_run

    Registry.register_dataset(DATASET)(_samples)

    errors = _Errors()
    logger = logging.getLogger("olive")
    saved_handlers, saved_level = logger.handlers[:], logger.level
    log = logging.FileHandler(work / "olive.log")
    logger.handlers = [log, errors]
    saved_tempdir = tempfile.tempdir  # Olive sets the process-wide temp folder
    outcome, failure = None, None
    try:
        outcome = olive_run(_workflow(source, passes, npz, work), tempdir=str(work / "tmp"))
    except Exception as exc:  # noqa: BLE001 - named below with the pass that failed
        failure = exc
    finally:
        tempfile.tempdir = saved_tempdir
        logger.handlers, logger.level = saved_handlers, saved_level
        log.close()
    footprint_file = work / "output" / "footprint.json"
    footprint = json.loads(footprint_file.read_text()) if footprint_file.exists() else {}
    chain = _chain(footprint, source)
    best = outcome.get_best_candidate() if outcome is not None and failure is None else None
    if best is None or len(chain) != len(passes) or any(step["pruned"] for step in chain):
        index = next((i for i, step in enumerate(chain) if step["pruned"]), min(len(chain), len(passes) - 1))
        cause = failure or (errors.exceptions[-1] if errors.exceptions else None)
        why = _one_line(cause) if cause else (errors.messages[-1] if errors.messages else "no output model")
        raise ModelError(f"{field}.passes[{index}] ({passes[index]['type']}): Olive failed: {why}")
    return Path(best.model_path), chain


def run_passes(source: Path, passes: list[dict], calibration: dict, work: Path, field: str = "olive") -> dict:
    """Run Olive passes ([{type, config}]) on an ONNX file, offline, in `work` (which must exist and is left with
    Olive's cache and output); calibration: {input: samples} for passes that take data. Returns the output model
    path, the checked passes and each pass's record; errors name `<field>.passes[i]`."""
    if known_passes() is None:
        raise ModelError(f"{field}: Olive passes need olive-ai; install the `olive` extra "
                         "(pip install -e '.[olive]' -c constraints.txt)")
    for name, value in OFFLINE.items():
        os.environ.setdefault(name, value)
    checked = _checked_passes(passes, field)
    npz = work / "calibration.npz"
    save_arrays(npz, calibration)
    produced, chain = _run_olive(source, checked, npz, work, field)
    steps, previous = [], source
    for index, (given, step) in enumerate(zip(checked, chain)):
        # Olive moves the last pass's model from its cache to the output folder.
        path = produced if index == len(chain) - 1 else step["path"]
        change = _graph_change(previous, path) if path.is_file() else {"graph": "not kept by Olive"}
        steps.append({"index": index, "type": given["type"], "config": given["config"],
                      "resolved_config": _portable(step["config"]), "seconds": step["seconds"], **change})
        previous = path if path.is_file() else previous
    return {"model": produced, "passes": checked, "steps": steps}


def run(config: Config, inputs: dict[str, Path], out: Path, context: dict) -> dict:
    variant = config.variant
    source = artifacts.quantizable(inputs["onnx"])  # the same input the other precision variants take
    calibration, calibration_sha = draw_samples(artifacts.inputs(inputs["data"]), variant.calibration.samples,
                                                 variant.calibration.seed)
    with tempfile.TemporaryDirectory(prefix="olive-", dir=out.parent) as folder:
        result = run_passes(source, [p.model_dump() for p in variant.passes or []], calibration, Path(folder),
                            f"variants.{variant.name}")
        onnx_runtime.optimize_offline(result["model"], artifacts.onnx_model(out), config.level)
        finish = {"ort_offline_level": config.level, **_graph_change(result["model"], artifacts.onnx_model(out))}
    # Seconds go to the step summary, not the record: the output stays byte-identical for the same inputs.
    seconds = {f"passes[{s['index']}]": s.pop("seconds") for s in result["steps"]}
    passes = result["passes"]
    record = {
        "variant": variant.name,
        "olive_version": version_of(DISTRIBUTION),
        "source": "optimize/quantizable.onnx",
        "calibration": {"samples": variant.calibration.samples, "seed": variant.calibration.seed,
                        "sha256": calibration_sha, "data_config": CALIBRATION},
        "passes": result["steps"],
        "finish": finish,
    }
    (out / "olive.json").write_text(json.dumps(record, indent=2, default=str))
    uses_data = any("data_config" in s["resolved_config"] for s in result["steps"])
    artifacts.write_quantize_record(out, {
        "variant": variant.name,
        "kind": "olive",
        "passes": [p["type"] for p in passes],
        "olive_version": record["olive_version"],
        "reduce_range": None,
        "calibration": record["calibration"] if uses_data else None,
        "fallback": None,
        "bytes": artifacts.onnx_bytes(artifacts.onnx_model(out)),
        "fp32_bytes": artifacts.onnx_bytes(artifacts.onnx_model(inputs["onnx"])),
        "record": "olive.json",
    })
    return {"variant": variant.name, "kind": "olive", "olive": record["olive_version"],
            "passes": [p["type"] for p in passes], "pass_seconds": seconds,
            "bytes": artifacts.onnx_bytes(artifacts.onnx_model(out))}


def plan(graph) -> None:
    """One step per Olive variant, on the same input the other precision variants take."""
    for variant in graph.variants(VARIANTS):
        config = {"variant": variant.model_dump(mode="json", include={"name", "kind", "passes", "calibration"}),
                  "level": graph.recipe.optimize.level}
        graph.add_variant(variant, graph.add(f"olive.{variant.name}", config, {"onnx": "optimize", "data": "data"}))
