"""quantize: one precision variant of the optimized FP32 model (fp16, int8-dynamic, int8-static QDQ), checked
against the original framework's outputs with the variant's parity gates, and repaired when it misses them.

Accuracy-aware fallback: run the FP32 and the quantized graph on the same samples, measure for every quantized
node the signal-to-quantization-noise ratio (SQNR) its output loses relative to its inputs (the noise the node
itself adds, not what it inherits), keep the worst nodes in float (`nodes_to_exclude`) and quantize again,
until the gates pass or the budget (rounds, excluded fraction) is used. Every round and what it cost is
recorded in quantize.json. Calibration samples are drawn with the recipe's seed and their hash recorded;
the same seed and data give a byte-identical model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

import numpy as np
from pydantic import Field

from pipeline import progress
from pipeline.errors import ModelError, first_line
from pipeline.schema import Seed, Slug, StageConfig, Strict
from pipeline.versions import onnxruntime_distribution
from stages import artifacts, gate, machine, onnx_runtime
from stages.calibration import CalibrationReader, draw_samples
from stages.optimize import Level

VERSION = 6


class Calibration(Strict):
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    samples: int = Field(64, ge=1, le=100_000, description="Drawn from the validation data with the seed; their hash is recorded")
    seed: Seed = 0


class Fallback(Strict):
    """Accuracy-aware fallback: when the variant misses its parity gates, keep the nodes that add the most
    quantization noise in float and quantize again, within a budget."""

    enabled: bool = True
    max_rounds: int = Field(4, ge=1)
    nodes_per_round: int = Field(2, ge=1)
    max_excluded_fraction: float = Field(0.25, gt=0, le=1, description="Of the quantizable nodes")


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
    activation_type: Literal["uint8", "int8"] = "uint8"
    calibration: Calibration = Field(default_factory=Calibration)


VARIANTS = {"fp16": Fp16Variant, "int8-dynamic": Int8DynamicVariant, "int8-static": Int8StaticVariant}
QuantizeVariant = Annotated[Union[Fp16Variant, Int8DynamicVariant, Int8StaticVariant], Field(discriminator="kind")]


class Config(StageConfig):
    variant: QuantizeVariant
    gates: gate.ParityGates
    level: Level


INPUTS = {"onnx": artifacts.ONNX, "data": artifacts.SAMPLES, "metrics": artifacts.METRICS}
OUTPUT = artifacts.ONNX
QUANTIZABLE = {"Conv", "MatMul", "Gemm", "Attention", "ConvTranspose", "MatMulNBits"}
SQNR_SAMPLES = 16
FUSED_ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid"}


def tools(config: Config, inputs: dict[str, Path]) -> list[str]:
    return ["onnx", onnxruntime_distribution(), "numpy"]


def _reduce_range(setting) -> tuple[bool, str]:
    if setting == "auto":
        vnni = machine.has_vnni()
        return (not vnni, "auto: CPU has VNNI" if vnni else "auto: CPU without VNNI (u8s8 can saturate on AVX2)")
    return bool(setting), "recipe"


def _quantize(kind: str, variant: QuantizeVariant, source: Path, target: Path, calibration: dict | None,
              reduce_range: bool, exclude: list[str]) -> None:
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
    elif kind == "int8-dynamic":
        quantize_dynamic(source, target, per_channel=variant.per_channel, reduce_range=reduce_range,
                         weight_type=types[variant.weight_type], nodes_to_exclude=exclude, extra_options=extra,
                         use_external_data_format=large)
    else:
        methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                   "percentile": CalibrationMethod.Percentile}
        quantize_static(source, target, CalibrationReader(calibration), quant_format=QuantFormat.QDQ,
                        per_channel=variant.per_channel, reduce_range=reduce_range,
                        activation_type=types[variant.activation_type], weight_type=types[variant.weight_type],
                        calibrate_method=methods[variant.calibration.method], nodes_to_exclude=exclude,
                        extra_options=extra, use_external_data_format=large)


def _float_outputs(graph) -> list[str]:
    """Softmax nodes that produce a graph output, kept in float. ONNX Runtime's static quantizer pins a Softmax
    output to [0, 1] in 1/255 steps, which rounds a spread-out distribution (1000 classes at ~0.001) to all
    zeros; at a graph output the caller gets floats anyway, so quantizing it buys nothing."""
    outputs = {o.name for o in graph.output}
    return [n.name for n in graph.node if n.op_type == "Softmax" and n.name and n.output[0] in outputs]


def _judge(path: Path, feeds, reference: dict, labels, gates: dict) -> tuple[list[dict], dict]:
    """The variant's parity verdicts against the original framework's outputs (no latency here)."""
    sess = onnx_runtime.session(path)
    names = [o.name for o in sess.get_outputs()]
    found, metrics = gate.judge_parity(dict(zip(names, onnx_runtime.run(sess, feeds))), reference, labels, gates)
    summary = {n: {k: metrics["outputs"][n].get(k) for k in ("cosine", "max_abs_error", "top1_agreement")} for n in names}
    if metrics["task"]:
        summary["accuracy"] = metrics["task"]["candidate"]
    return found, summary


def _score(found: list[dict], measured: dict) -> tuple:
    """Better = fewer failed gates, then a higher mean output cosine."""
    cosines = [m["cosine"] for m in measured.values() if isinstance(m, dict) and m.get("cosine") is not None]
    return (-sum(not v["passed"] for v in found), float(np.mean(cosines)) if cosines else 0.0)


def _sqnr(reference: np.ndarray, candidate: np.ndarray) -> float:
    ref = reference.astype(np.float64)
    noise = float(np.sum((ref - candidate.astype(np.float64)) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0:
        return float("inf")
    return float(10 * np.log10(max(signal, 1e-30) / noise))


def noisiest_nodes(fp32: Path, quantized: Path, feeds: dict[str, np.ndarray]) -> list[dict]:
    """Quantizable FP32 nodes ranked by the SQNR they lose: output SQNR below their worst input's."""
    from stages.localize import onnx_tensors

    model = artifacts.load_graph(fp32)
    reference = onnx_tensors(fp32, feeds)
    candidate = onnx_tensors(quantized, feeds)
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    ranked = []
    for node in model.graph.node:
        if node.op_type not in QUANTIZABLE or not node.name:
            continue
        out = node.output[0]
        if out not in candidate:
            # The quantizer fuses a following activation (Conv+Relu): compare at the activation's output.
            following = consumers.get(out, [])
            if len(following) == 1 and following[0].op_type in FUSED_ACTIVATIONS:
                out = following[0].output[0]
        if out not in reference or out not in candidate or reference[out].shape != candidate[out].shape:
            continue
        output_sqnr = _sqnr(reference[out], candidate[out])
        input_sqnr = [_sqnr(reference[i], candidate[i]) for i in node.input
                      if i in reference and i in candidate and reference[i].shape == candidate[i].shape]
        inherited = min(input_sqnr) if input_sqnr else float("inf")
        # Relative noise power the node adds on top of what its inputs already carry.
        added = max(0.0, 10 ** (-output_sqnr / 10) - (10 ** (-inherited / 10) if np.isfinite(inherited) else 0.0))
        ranked.append({"node": node.name, "op": node.op_type, "sqnr_db": round(float(output_sqnr), 2),
                       "added_noise": float(added)})
    return sorted(ranked, key=lambda r: (-r["added_noise"], r["node"]))


def _fallback(fallback: Fallback, quantizable: list[str], build, judge, rank, found: list[dict],
              measured: dict) -> tuple[list[str], list[dict], list[dict], str | None]:
    """The accuracy-aware fallback loop: while a gate fails, keep the noisiest nodes not yet tried in float
    (`build(excluded)` quantizes and finishes, `judge()` gives the verdicts, `rank()` the nodes by added noise),
    keeping a round only when it helps. Returns (excluded, verdicts, rounds, why it stopped)."""
    budget = int(fallback.max_excluded_fraction * len(quantizable))
    excluded: list[str] = []
    tried: set[str] = set()
    rounds: list[dict] = []
    stopped = None
    while any(not v["passed"] for v in found):
        if not fallback.enabled:
            stopped = "fallback disabled"
            break
        if len(rounds) >= fallback.max_rounds:
            stopped = f"budget used: max_rounds {fallback.max_rounds}"
            break
        room = budget - len(excluded)
        if room <= 0:
            stopped = f"budget used: max_excluded_fraction {fallback.max_excluded_fraction} ({budget} of {len(quantizable)} nodes)"
            break
        ranked = [r for r in rank() if r["node"] not in excluded]
        ranked = [r for r in ranked if r["node"] not in tried]
        if not ranked:
            stopped = "no quantized node left whose float fallback helps"
            break
        chosen = ranked[: min(fallback.nodes_per_round, room)]
        tried.update(r["node"] for r in chosen)
        trial = excluded + [r["node"] for r in chosen]
        progress.update(f"fallback round {len(rounds) + 1} of at most {fallback.max_rounds}: "
                        f"{len(trial)} node(s) kept in float")
        build(trial)
        trial_found, trial_measured = judge()
        helped = _score(trial_found, trial_measured) > _score(found, measured)
        rounds.append({"excluded": chosen, "after": trial_measured, "kept": helped,
                       "passed": all(v["passed"] for v in trial_found)})
        if helped:
            excluded, found, measured = trial, trial_found, trial_measured
        else:  # keeping these in float did not help: quantize them again and try the next ones
            build(excluded)
    return excluded, found, rounds, stopped


def run(config: Config, inputs: dict[str, Path], out: Path, context: dict) -> dict:
    variant, gates = config.variant, config.gates.model_dump(mode="json")
    kind = variant.kind
    source = artifacts.quantizable(inputs["onnx"])
    feeds = artifacts.inputs(inputs["data"])
    labels = artifacts.labels(inputs["data"])
    reference = artifacts.reference(inputs["metrics"])
    reduce_range, reduce_reason = _reduce_range(variant.reduce_range) if kind != "fp16" else (False, None)
    calibration, calibration_sha = (None, None)
    if kind == "int8-static":
        calibration, calibration_sha = draw_samples(feeds, variant.calibration.samples, variant.calibration.seed)

    graph = artifacts.load_graph(source).graph
    quantizable = [n.name for n in graph.node if n.op_type in QUANTIZABLE and n.name]
    kept_float = _float_outputs(graph) if kind == "int8-static" else []
    raw = out.parent / "quantized-raw.onnx"  # outside out/: node names as in the source, for the fallback
    target = artifacts.onnx_model(out)
    probe = {k: v[:SQNR_SAMPLES] for k, v in feeds.items()}

    def build(excluded: list[str]) -> None:
        _quantize(kind, variant, source, raw, calibration, reduce_range, kept_float + excluded)
        onnx_runtime.optimize_offline(raw, target, config.level)

    try:
        progress.update(f"quantizing ({kind})")
        build([])
        found, first = _judge(target, feeds, reference, labels, gates)
        excluded, found, rounds, stopped = _fallback(
            variant.fallback, quantizable, build, lambda: _judge(target, feeds, reference, labels, gates),
            lambda: noisiest_nodes(source, raw, probe), found, first)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - the quantizer's failure is this model's, named as such
        raise ModelError(f"variants.{variant.name}: {kind} quantization failed: {type(exc).__name__}: "
                         f"{first_line(exc, 200)}") from None

    record = {
        "variant": variant.name,
        "kind": kind,
        "per_channel": getattr(variant, "per_channel", None),
        "reduce_range": reduce_range if kind != "fp16" else None,
        "reduce_range_reason": reduce_reason if kind != "fp16" else None,
        "calibration": {**variant.calibration.model_dump(mode="json"), "sha256": calibration_sha}
        if calibration_sha else None,
        "quantizable_nodes": len(quantizable),
        "before_fallback": first,
        "kept_float": kept_float,
        "fallback": {"rounds": rounds, "excluded": excluded, "stopped": stopped},
        "passes_parity": all(v["passed"] for v in found),
        "bytes": artifacts.onnx_bytes(target),
        "fp32_bytes": artifacts.onnx_bytes(artifacts.onnx_model(inputs["onnx"])),
    }
    artifacts.write_quantize_record(out, record)
    return {k: record[k] for k in ("variant", "kind", "reduce_range", "passes_parity", "bytes")} | {
        "excluded_nodes": excluded, "rounds": len(rounds)}


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
