"""PyTorch models from MLflow's pytorch flavor: load, run, export with torch.onnx (dynamo or TorchScript)."""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from pipeline.errors import ModelError, first_line
from pipeline.schema import Strict
from stages.frameworks import rename_tensor
from stages.tensors import ModelSpec

TOOLS = ["torch", "mlflow", "onnxscript"]
Exporter = Literal["dynamo", "torchscript"]


class ExportOptions(Strict):
    exporter: Exporter = Field(
        "dynamo", description="PyTorch: torch.onnx exporter; torchscript gives the attention fusions on BERT-like models"
    )


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def load(model_dir: Path, options: dict | None = None):
    import mlflow.pytorch

    try:
        model = mlflow.pytorch.load_model(str(model_dir))
    except Exception as exc:  # noqa: BLE001 - a model that does not load is the user's input problem
        raise ModelError(f"model {model_dir}: mlflow.pytorch.load_model failed: {type(exc).__name__}: {exc}") from None
    if hasattr(model, "eval"):
        model.eval()
    return model


def _call_style(model, spec: ModelSpec) -> str:
    """'kwargs' when forward names every input, else 'args' in the spec's order."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "args"
    names = {t.name for t in spec.inputs}
    return "kwargs" if names <= set(params) else "args"


def _tensors(spec: ModelSpec, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    import torch

    return {t.name: torch.from_numpy(np.ascontiguousarray(feeds[t.name])) for t in spec.inputs}


def _flatten(value) -> list:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if hasattr(value, "to_tuple"):  # transformers ModelOutput
        value = value.to_tuple()
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _flatten(item)]
    raise ModelError(f"model output of type {type(value).__name__} is not a tensor, tuple or dict of tensors")


def predict(model, spec: ModelSpec, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import torch

    tensors = _tensors(spec, feeds)
    with torch.inference_mode():
        if _call_style(model, spec) == "kwargs":
            result = model(**tensors)
        else:
            result = model(*[tensors[t.name] for t in spec.inputs])
    return [t.detach().cpu().numpy() for t in _flatten(result)]


def runner(model, spec: ModelSpec, feeds: dict[str, np.ndarray]):
    """A zero-argument callable that runs the model once on feeds (for latency measurement)."""
    import torch

    tensors = _tensors(spec, feeds)
    ordered = [tensors[t.name] for t in spec.inputs]
    kwargs = _call_style(model, spec) == "kwargs"

    def call():
        with torch.inference_mode():
            return model(**tensors) if kwargs else model(*ordered)

    return call


def export_onnx(model, spec: ModelSpec, feeds, output_names: list[str], exporter: str, opset: int, path: Path) -> dict:
    import torch

    tensors = _tensors(spec, feeds)
    # The dynamo exporter names intermediate tensors after the ops that make them (an `embedding` lookup
    # gives a tensor `embedding`), so a requested output name can collide with one (two producers, an
    # invalid graph). It exports under names nothing can share; they are renamed afterwards.
    requested, output_names = output_names, ([f"kiln_output_{i}" for i in range(len(output_names))]
                                             if exporter == "dynamo" else output_names)
    dynamic_axes = {t.name: t.dynamic_axes() for t in spec.inputs if t.dynamic_axes()}
    if spec.batch_axis_named:
        batch = spec.inputs[0].shape[0]
        dynamic_axes.update({name: {0: batch} for name in output_names})
    if _call_style(model, spec) == "kwargs":
        args, kwargs = (), tensors
    else:
        args, kwargs = tuple(tensors[t.name] for t in spec.inputs), None
    log = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log):
            warnings.simplefilter("ignore")
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            torch.onnx.export(
                model,
                args,
                str(path),
                kwargs=kwargs,
                input_names=[t.name for t in spec.inputs],
                output_names=output_names,
                dynamic_axes=dynamic_axes or None,
                opset_version=opset,
                dynamo=exporter == "dynamo",
                external_data=False,
            )
    except Exception as exc:  # noqa: BLE001 - an export failure is the model's (or the recipe's) problem
        first = first_line(exc, empty=type(exc).__name__)
        raise ModelError(
            f"export.exporter {exporter}: torch.onnx.export failed: {type(exc).__name__}: {first} "
            f"(try export.exporter: {'torchscript' if exporter == 'dynamo' else 'dynamo'})"
        ) from None
    if output_names != requested:
        import onnx

        graph = onnx.load(str(path))
        rename_outputs(graph, requested)
        onnx.save(graph, str(path))
    return {"exporter": exporter, "opset": opset, "call": _call_style(model, spec)}


def rename_outputs(model, names: list[str]) -> None:
    """Give the graph's outputs these names; a tensor that already has one of them is renamed out of the way."""
    graph = model.graph
    taken = {n for node in graph.node for n in (*node.input, *node.output)} | {i.name for i in graph.initializer}
    for output, new in zip(list(graph.output), names):
        if output.name == new:
            continue
        if new in taken:
            spare = next(f"{new}_{i}" for i in range(1, 10**6) if f"{new}_{i}" not in taken)
            rename_tensor(graph, new, spare)
            taken.add(spare)
        rename_tensor(graph, output.name, new)
        taken.add(new)


def layer_outputs(model, spec: ModelSpec, feeds: dict[str, np.ndarray]) -> list[tuple[str, str, np.ndarray]]:
    """(qualified module name, module type, output) for every submodule, in the order they finished."""
    import torch

    records: list[tuple[str, str, np.ndarray]] = []
    seen: set[str] = set()

    def hook_for(name: str):
        def hook(module, args, output):
            tensors = _flatten(output) if not isinstance(output, torch.Tensor) else [output]
            if name not in seen and tensors and tensors[0].is_floating_point():
                seen.add(name)
                records.append((name, type(module).__name__, tensors[0].detach().cpu().numpy().copy()))

        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in model.named_modules() if n]
    try:
        predict(model, spec, feeds)
    except ModelError:
        return []
    finally:
        for handle in handles:
            handle.remove()
    return records
