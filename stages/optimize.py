"""optimize: onnxruntime.transformers fusions (when the recipe names a transformer model type, or the export
read one from the model's config), then ONNX Runtime's offline graph optimization. Records node counts and which fused operators appeared."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

from typing import Literal

from pydantic import ConfigDict, Field

from pipeline.errors import ModelError
from pipeline.schema import StageConfig, Strict
from pipeline.versions import onnxruntime_distribution
from stages import artifacts

VERSION = 3
Level = Literal["disabled", "basic", "extended", "all"]


class TransformerFusion(Strict):
    model_type: Literal["bert", "bart", "gpt2", "t5", "vit", "clip"] = "bert"
    num_heads: int = Field(0, ge=0, description="0 = let onnxruntime detect")
    hidden_size: int = Field(0, ge=0, description="0 = let onnxruntime detect")


class Config(StageConfig):
    """The recipe's `optimize` section, and one fusion option of `tune.space.fusion`."""

    model_config = ConfigDict(extra="forbid", title="Optimize")

    level: Level = Field(
        "extended", description="ONNX Runtime offline graph optimization level ('all' adds CPU-layout-specific ops)"
    )
    transformer: TransformerFusion | None = Field(None, description="onnxruntime.transformers fusions")


INPUTS = {"onnx": artifacts.ONNX}
OUTPUT = artifacts.ONNX


def tools(config: Config, inputs: dict[str, Path]) -> list[str]:
    return ["onnx", onnxruntime_distribution()]


def _transformer(config: Config, exported: Path) -> tuple[TransformerFusion | None, str | None]:
    """The fusion to run and where its settings came from: the recipe's `optimize.transformer` when set (it wins),
    else what the export read from the model's own config (a transformers model), else none."""
    if config.transformer:
        return config.transformer, "recipe optimize.transformer"
    hint = artifacts.fusion_hint(exported)
    if hint is None:
        return None, None
    return TransformerFusion(**{k: v for k, v in hint.items() if k != "from"}), hint["from"]


def run(config: Config, inputs: dict[str, Path], out: Path, context: dict) -> dict:
    from stages import onnx_runtime

    source = artifacts.onnx_model(inputs["onnx"])
    before = artifacts.op_counts(source)
    fusions: dict[str, int] = {}
    current = source
    transformer, origin = _transformer(config, inputs["onnx"])
    if transformer:
        from onnxruntime.transformers.optimizer import optimize_model

        log = io.StringIO()
        logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
        try:
            with contextlib.redirect_stdout(log):
                fused = optimize_model(
                    str(source),
                    model_type=transformer.model_type,
                    num_heads=transformer.num_heads,
                    hidden_size=transformer.hidden_size,
                    opt_level=0,  # graph-level optimization happens below, once, at the recipe's level
                    use_gpu=False,
                )
        except Exception as exc:  # noqa: BLE001
            raise ModelError(
                f"optimize.transformer: onnxruntime fusion for model_type {transformer.model_type} failed: {exc}"
            ) from None
        fusions = {k: v for k, v in fused.get_fused_operator_statistics().items() if v}
        current = out / "fused.onnx"
        fused.save_model_to_file(str(current), use_external_data_format=artifacts.onnx_bytes(source)
                                 > artifacts.external_data_bytes())

    target = artifacts.onnx_model(out)
    onnx_runtime.optimize_offline(current, target, config.level)
    # Precision variants start from a graph with only portable (basic) optimizations: the extended level's
    # fused CPU kernels (FusedConv, FusedGemm, ...) are not quantizable.
    onnx_runtime.optimize_offline(current, artifacts.quantizable(out), "basic")
    if current != source:
        artifacts.remove_onnx(current)
    after = artifacts.op_counts(target)
    return {
        "level": config.level,
        "transformer": transformer.model_type if transformer else None,
        "transformer_settings": ({"num_heads": transformer.num_heads, "hidden_size": transformer.hidden_size,
                                  "from": origin} if transformer else None),
        "fusions": fusions,
        "nodes_before": sum(before.values()),
        "nodes_after": sum(after.values()),
        "bytes": artifacts.onnx_bytes(target),
        "external_data": artifacts.data_file_name(target),
    }


def plan(graph) -> None:
    """The FP32 candidate: the export, optimized at the recipe's level."""
    graph.add("optimize", graph.recipe.optimize.model_dump(mode="json"), {"onnx": "export"})
    graph.add_candidate("fp32", model="optimize", exported="export")
