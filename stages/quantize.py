"""quantize: one precision variant of the optimized FP32 model (fp16, int8-dynamic, int8-static QDQ, weight-only
MatMulNBits), checked against the original framework's outputs with the variant's parity gates, and repaired when it
misses them by the accuracy-aware fallback (stages/fallback.py: the nodes that matter, found by measuring their
end-to-end effect, kept in float). Every round, probe and what it cost is recorded in quantize.json, with the
machine's ISA (VNNI changes what INT8 costs). Calibration samples are drawn with the recipe's seed and their hash
recorded; the same seed and data give a byte-identical model, fallback included.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Annotated, Literal, Union

import numpy as np
from pydantic import Field, field_validator

from pipeline import progress
from pipeline.errors import ModelError, first_line
from pipeline.schema import Seed, Slug, StageConfig, Strict
from pipeline.versions import onnxruntime_distribution
from stages import artifacts, fallback, gate, latency, machine, onnx_runtime
from stages.calibration import CalibrationReader, draw_samples, sample_rows
from stages.fallback import Fallback
from stages.optimize import Level
from stages.tensors import batch_of, chunked_outputs

VERSION = 8


class Calibration(Strict):
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    samples: int = Field(64, ge=1, le=100_000, description="Drawn from the validation data with the seed; their hash is recorded")
    seed: Seed = 0


class VariantBase(Strict):
    """A precision variant built from the optimized FP32 model and validated against the original."""

    name: Slug
    gates: gate.ParityGates | None = Field(None, description="Parity gates for this variant; default: gates.parity")


class Fp16Variant(VariantBase):
    kind: Literal["fp16"]
    keep_io_types: bool = Field(True, description="Keep float32 inputs and outputs")
    op_block_list: list[str] = Field(default_factory=list, description="Op types kept in float32")
    fallback: Fallback = Field(default_factory=Fallback)


class Int8DynamicVariant(VariantBase):
    kind: Literal["int8-dynamic"]
    per_channel: bool = True
    reduce_range: bool | Literal["auto"] = Field(
        "auto", description="auto: on CPUs without VNNI (u8s8 can saturate on AVX2), recorded in the manifest"
    )
    weight_type: Literal["int8", "uint8"] = "int8"
    fallback: Fallback = Field(default_factory=Fallback)


class Int8StaticVariant(Int8DynamicVariant):
    kind: Literal["int8-static"]  # type: ignore[assignment]
    activation_type: Literal["uint8", "int8"] = Field(
        "uint8", description="uint8: U8S8 (with int8 weights), int8: S8S8. Which is faster depends on the CPU "
        "(VNNI or not, recorded in quantize.json); benchmarks/int8_levers.py measures both")
    calibration: Calibration = Field(default_factory=Calibration)


class WeightOnlyVariant(VariantBase):
    """Weight-only quantization: MatMul weights in 4 or 8 bits, blockwise (ONNX Runtime's MatMulNBits);
    activations stay float. Only MatMul nodes with a constant weight change (a fused Attention does not)."""

    kind: Literal["weight-only"]
    bits: Literal[4, 8] = 8
    block_size: int = Field(32, ge=16, description="Weights per scale; a power of two")
    symmetric: bool = True
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(
        4, description="Compute type of MatMulNBits on CPU: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 (fastest)")
    fallback: Fallback = Field(default_factory=Fallback)

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"block_size {value} is not a power of two")
        return value


VARIANTS = {"fp16": Fp16Variant, "int8-dynamic": Int8DynamicVariant, "int8-static": Int8StaticVariant,
            "weight-only": WeightOnlyVariant}
QuantizeVariant = Annotated[Union[Fp16Variant, Int8DynamicVariant, Int8StaticVariant, WeightOnlyVariant],
                            Field(discriminator="kind")]


class Config(StageConfig):
    variant: QuantizeVariant
    gates: gate.ParityGates
    level: Level


INPUTS = {"onnx": artifacts.ONNX, "data": artifacts.SAMPLES, "metrics": artifacts.METRICS}
OUTPUT = artifacts.ONNX
# What an fp16 conversion changes is every float op; its fallback candidates are the compute-heavy ones.
FP16_CANDIDATES = {"Conv", "MatMul", "Gemm", "Attention", "ConvTranspose"}
SQNR_SAMPLES = 4


def tools(config: Config, inputs: dict[str, Path]) -> list[str]:
    return ["onnx", onnxruntime_distribution(), "numpy"]


def _reduce_range(setting) -> tuple[bool, str]:
    if setting == "auto":
        vnni = machine.has_vnni()
        return (not vnni, "auto: CPU has VNNI" if vnni else "auto: CPU without VNNI (u8s8 can saturate on AVX2)")
    return bool(setting), "recipe"


def _weight_only(variant: WeightOnlyVariant, source: Path, target: Path, exclude: list[str], large: bool) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    algorithm = DefaultWeightOnlyQuantConfig(block_size=variant.block_size, is_symmetric=variant.symmetric,
                                             accuracy_level=variant.accuracy_level, bits=variant.bits)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), bits=variant.bits, block_size=variant.block_size,
                                     is_symmetric=variant.symmetric, accuracy_level=variant.accuracy_level,
                                     nodes_to_exclude=exclude, algo_config=algorithm)
    quantizer.process()
    quantizer.model.save_model_to_file(str(target), large)


def _quantize(kind: str, variant: QuantizeVariant, source: Path, target: Path, calibration: dict | None,
              reduce_range: bool, exclude: list[str], cache: Path | None = None) -> None:
    """Quantize `source` into `target` with the `exclude` nodes left in float. `cache`: where static
    calibration's ranges are kept, so that every fallback round and probe quantizes with the same ranges
    without calibrating again."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    # Fused transformer graphs carry tensors without inferred types; the quantizer then needs a default.
    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    # A model over protobuf's limit is read and written with external data (`<target>.data`); the data file a
    # previous round left is removed first, since ONNX appends to an existing one.
    large = artifacts.onnx_bytes(source) > artifacts.external_data_bytes()
    artifacts.data_file(target).unlink(missing_ok=True)
    if kind == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=variant.keep_io_types,
                                         op_block_list=variant.op_block_list or None, node_block_list=exclude or None)
        artifacts.save_onnx(model, target)
    elif kind == "weight-only":
        _weight_only(variant, source, target, exclude, large)
    elif kind == "int8-dynamic":
        quantize_dynamic(source, target, per_channel=variant.per_channel, reduce_range=reduce_range,
                         weight_type=types[variant.weight_type], nodes_to_exclude=exclude, extra_options=extra,
                         use_external_data_format=large)
    else:
        methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                   "percentile": CalibrationMethod.Percentile}
        with tempfile.TemporaryDirectory(prefix="kiln-calibration-") as scratch:
            cache = cache or Path(scratch) / "calibration.json"  # a single call: ranges for this call only
            cached = {"calibration_cache_path": cache} if _caches_calibration() else {}
            if cached and variant.calibration.method == "entropy" and not cache.exists():
                _entropy_ranges(source, calibration, cache, large)
            quantize_static(source, target, CalibrationReader(calibration), quant_format=QuantFormat.QDQ,
                            per_channel=variant.per_channel, reduce_range=reduce_range,
                            activation_type=types[variant.activation_type], weight_type=types[variant.weight_type],
                            calibrate_method=methods[variant.calibration.method], nodes_to_exclude=exclude,
                            extra_options=extra, use_external_data_format=large, **cached)


def _entropy_ranges(source: Path, calibration: dict, cache: Path, large: bool) -> None:
    """ONNX Runtime's quantize_static builds its entropy calibrator with as many histogram bins as quantized
    bins (128 and 128), which leaves one candidate threshold, the full range: its entropy calibration gives
    minmax's scales exactly (measured, ORT 1.32). kiln computes the ranges with ORT's own entropy calibrator at
    2048 bins into 128 and hands them to quantize_static as its calibration cache."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator, save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    with tempfile.TemporaryDirectory(prefix="kiln-entropy-") as folder:
        calibrator = create_calibrator(source, sorted(set(QLinearOpsRegistry) | set(QDQRegistry)),
                                       augmented_model_path=str(Path(folder) / "augmented.onnx"),
                                       calibrate_method=CalibrationMethod.Entropy, use_external_data_format=large,
                                       extra_options={"num_bins": 2048, "num_quantized_bins": 128})
        calibrator.collect_data(CalibrationReader(calibration))
        save_tensors_data(calibrator.compute_data(), cache)


def _caches_calibration() -> bool:
    """ONNX Runtime 1.23+ keeps calibration ranges in a file between quantize_static calls."""
    import inspect

    from onnxruntime.quantization import quantize_static

    return "calibration_cache_path" in inspect.signature(quantize_static).parameters


def _float_outputs(graph) -> list[str]:
    """Softmax nodes that produce a graph output, kept in float. ONNX Runtime's static quantizer pins a Softmax
    output to [0, 1] in 1/255 steps, which rounds a spread-out distribution (1000 classes at ~0.001) to all
    zeros; at a graph output the caller gets floats anyway, so quantizing it buys nothing."""
    outputs = {o.name for o in graph.output}
    return [n.name for n in graph.node if n.op_type == "Softmax" and n.name and n.output[0] in outputs]


def _sqnr(reference: np.ndarray, candidate: np.ndarray) -> float:
    ref = reference.astype(np.float64)
    noise = float(np.sum((ref - candidate.astype(np.float64)) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0:
        return float("inf")
    return float(10 * np.log10(max(signal, 1e-30) / noise))


def added_noise(fp32: Path, quantized: Path, feeds: dict[str, np.ndarray], nodes: list, graph) -> dict[str, float]:
    """The SQNR pass: for each of `nodes`, the relative noise power its output adds on top of what its inputs
    already carry (output SQNR below its worst input's); `graph` is fp32's. Cheap (two runs), and a tie-break
    only: a node's own noise says little about what it does to the model's output."""
    from stages.localize import onnx_tensors

    reference = onnx_tensors(fp32, feeds)
    candidate = onnx_tensors(quantized, feeds)
    activation = fallback.fused_activations(graph)
    found = {}
    for node in nodes:
        out = node.output[0]
        if out not in candidate and out in activation:
            # The quantizer fuses a following activation (Conv+Relu): compare at the activation's output.
            out = activation[out].output[0]
        if out not in reference or out not in candidate or reference[out].shape != candidate[out].shape:
            continue
        output_sqnr = _sqnr(reference[out], candidate[out])
        input_sqnr = [_sqnr(reference[i], candidate[i]) for i in node.input
                      if i in reference and i in candidate and reference[i].shape == candidate[i].shape]
        inherited = min(input_sqnr) if input_sqnr else float("inf")
        found[node.name] = max(0.0, 10 ** (-output_sqnr / 10) - (10 ** (-inherited / 10) if np.isfinite(inherited) else 0.0))
    return found


class _Variant:
    """One variant's build, judgement, probes and timing, as the fallback search asks for them."""

    def __init__(self, config: Config, inputs: dict[str, Path], out: Path):
        variant = self.variant = config.variant
        self.kind, self.level = variant.kind, config.level
        self.gates = config.gates.model_dump(mode="json")
        self.source = artifacts.quantizable(inputs["onnx"])
        self.spec = artifacts.spec(inputs["data"])
        self.feeds = artifacts.inputs(inputs["data"])
        self.labels = artifacts.labels(inputs["data"])
        self.reference = artifacts.reference(inputs["metrics"])
        self.reduce_range, self.reduce_reason = (_reduce_range(variant.reduce_range) if hasattr(variant, "reduce_range")
                                                 else (None, None))
        self.calibration, self.calibration_sha = None, None
        if self.kind == "int8-static":
            self.calibration, self.calibration_sha = draw_samples(self.feeds, variant.calibration.samples,
                                                                  variant.calibration.seed)
        rows = sample_rows(len(next(iter(self.feeds.values()))), variant.fallback.probe_samples,
                           getattr(getattr(variant, "calibration", None), "seed", 0))
        self.probe_feeds = {k: v[rows] for k, v in self.feeds.items()}
        self.probe_reference = {k: v[rows] for k, v in self.reference.items()}
        self.graph = artifacts.load_graph(self.source).graph  # read once: the fallback asks for it often
        self.kept_float = _float_outputs(self.graph) if self.kind == "int8-static" else []
        # Beside out/, not in it: node names as in the source (for the fallback), and calibration ranges.
        self.raw = out.parent / "quantized-raw.onnx"
        self.probe_path = out.parent / "probe.onnx"
        self.cache = out.parent / "calibration.json"
        self.cache.unlink(missing_ok=True)
        self.rounds = out.parent / "rounds"  # each kept round's model, timed side by side at the end
        shutil.rmtree(self.rounds, ignore_errors=True)
        self.rounds.mkdir()
        self.target = artifacts.onnx_model(out)

    def quantize(self, target: Path, excluded: list[str]) -> None:
        _quantize(self.kind, self.variant, self.source, target, self.calibration, self.reduce_range,
                  self.kept_float + excluded, self.cache)

    def build(self, excluded: list[str]) -> None:
        self.quantize(self.raw, excluded)
        onnx_runtime.optimize_offline(self.raw, self.target, self.level)

    def _outputs(self, path: Path, feeds: dict[str, np.ndarray], level: str) -> dict[str, np.ndarray]:
        sess = onnx_runtime.session(path, level=level)
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, chunked_outputs(lambda f: onnx_runtime.run(sess, f), self.spec, feeds)))

    def judge(self) -> tuple[list[dict], dict, float]:
        """The built model's parity verdicts against the original framework's outputs (no latency here)."""
        outputs = self._outputs(self.target, self.feeds, "disabled")
        found, metrics = gate.judge_parity(outputs, self.reference, self.labels, self.gates)
        summary = {n: {k: metrics["outputs"][n].get(k) for k in ("cosine", "mean_row_cosine", "error_to_signal",
                                                                  "max_abs_error", "top1_agreement")}
                   for n in outputs}
        if metrics["task"]:
            summary["accuracy"] = metrics["task"]["candidate"]
        return found, summary, fallback.relative_error(outputs, self.reference)

    def probe(self, excluded: list[str]) -> float:
        """The relative error on the probe samples with these nodes in float, run with the online
        optimizations the build would bake in."""
        self.quantize(self.probe_path, excluded)
        return fallback.relative_error(self._outputs(self.probe_path, self.probe_feeds, self.level),
                                       self.probe_reference)

    def keep(self, round_: int) -> None:
        folder = self.rounds / str(round_)
        folder.mkdir()
        artifacts.copy_onnx(self.target, artifacts.onnx_model(folder))

    def time(self, rounds: list[int]) -> dict[int, float]:
        """Each kept round's model at batch 1, side by side in one measurement (so that load from other steps
        building in parallel hits every round alike); taken while no other step times."""
        sessions = {r: onnx_runtime.session(artifacts.onnx_model(self.rounds / str(r))) for r in rounds}
        feeds = {r: onnx_runtime.feeds_for(sess, batch_of(self.spec, self.feeds, 1)) for r, sess in sessions.items()}
        calls = {str(r): (lambda s=sess, f=feeds[r]: s.run(None, f)) for r, sess in sessions.items()}
        with latency.exclusive():
            timed = latency.measure(calls, batch=1, warmup=2, min_iterations=10, min_seconds=0.5, target_ci=0.05,
                                    time_budget_s=2.0 * len(calls))
        return {r: round(timed[str(r)]["p50_ms"], 3) for r in rounds}

    def noise(self, nodes: list) -> dict[str, float]:
        feeds = {k: v[:SQNR_SAMPLES] for k, v in self.probe_feeds.items()}
        try:
            return added_noise(self.source, self.raw, feeds, nodes, self.graph)
        except Exception:  # noqa: BLE001 - only a tie-break between probes: without it, names order them
            return {}


def _candidates(work: _Variant) -> list:
    """The nodes the fallback may keep in float: what the quantizer changed in this graph (fp16: the
    compute-heavy ops, since a conversion changes every float op)."""
    if work.kind == "fp16":
        return [n for n in work.graph.node if n.op_type in FP16_CANDIDATES and n.name]
    return [n for n in fallback.changed_nodes(work.graph, artifacts.load_graph(work.raw).graph)
            if n.name not in work.kept_float]


def run(config: Config, inputs: dict[str, Path], out: Path, context: dict) -> dict:
    variant, kind = config.variant, config.variant.kind
    work = _Variant(config, inputs, out)
    try:
        progress.update(f"quantizing ({kind})")
        work.build([])
        found, first, error = work.judge()
        changed = _candidates(work)
        role = fallback.roles(work.graph, changed)
        failing = any(not v["passed"] for v in found)
        noise = work.noise(changed) if failing and variant.fallback.enabled and kind != "fp16" else {}
        hooks = fallback.Hooks(build=work.build, judge=work.judge, probe=work.probe, keep=work.keep, time=work.time)
        searched = fallback.search(variant.fallback, fallback.units(work.graph, changed, role), found, first, error,
                                   hooks, noise)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - the quantizer's failure is this model's, named as such
        raise ModelError(f"variants.{variant.name}: {kind} quantization failed: {type(exc).__name__}: "
                         f"{first_line(exc, 200)}") from None
    finally:
        work.cache.unlink(missing_ok=True)
        shutil.rmtree(work.rounds, ignore_errors=True)
        work.probe_path.unlink(missing_ok=True)
        artifacts.data_file(work.probe_path).unlink(missing_ok=True)

    excluded, found = searched["excluded"], searched["found"]
    here = machine.describe()
    record = {
        "variant": variant.name,
        "kind": kind,
        "settings": variant.model_dump(mode="json", exclude={"name", "kind", "gates", "fallback", "calibration"}),
        "per_channel": getattr(variant, "per_channel", None),
        "reduce_range": work.reduce_range,
        "reduce_range_reason": work.reduce_reason,
        "calibration": {**variant.calibration.model_dump(mode="json"), "sha256": work.calibration_sha}
        if work.calibration_sha else None,
        "machine": {"isa": here["isa"], "vnni": here["vnni"]},
        "changed_nodes": len(changed),
        "changed_ops": dict(sorted(Counter(n.op_type for n in changed).items())),
        "before_fallback": first,
        "kept_float": work.kept_float,
        "fallback": {k: searched[k] for k in ("excluded", "stopped", "curve", "probes", "budget_nodes")}
        | {"cost": searched.get("cost"), "roles": {n: role[n] for n in excluded}},
        "passes_parity": all(v["passed"] for v in found),
        "bytes": artifacts.onnx_bytes(work.target),
        "fp32_bytes": artifacts.onnx_bytes(artifacts.onnx_model(inputs["onnx"])),
    }
    artifacts.write_quantize_record(out, record)
    return {k: record[k] for k in ("variant", "kind", "reduce_range", "passes_parity", "bytes")} | {
        "excluded_nodes": excluded, "rounds": len(searched["curve"]) - 1}


def step_config(variant: VariantBase, gates, level: str) -> dict:
    return {"variant": variant.model_dump(mode="json", exclude={"gates"}), "gates": gates.model_dump(mode="json"),
            "level": level}


def plan(graph) -> None:
    """One step per precision variant of the kinds built here, from the FP32 candidate's quantizable copy."""
    recipe = graph.recipe
    for variant in graph.variants(VARIANTS):
        graph.add_variant(variant, graph.add(
            f"quantize.{variant.name}", step_config(variant, variant.gates or recipe.gates.parity, recipe.optimize.level),
            {"onnx": "optimize", "data": "data", "metrics": "validate"}))
