"""PyTorch models from MLflow's pytorch flavor: load, run, export with torch.onnx (dynamo or TorchScript).

Both of MLflow's serializations: `pickle` (the original nn.Module class) and `pt2`, MLflow 3's default, a
`torch.export` ExportedProgram. A pt2 model is run the way `mlflow.pytorch.load_model` returns it (the program's
module, a GraphModule that refuses `.eval()`) and exported from the program itself, so the dynamic dimensions
torch.export recorded are the ones the ONNX graph gets.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import Field

from pipeline.errors import ModelError, first_line
from pipeline.schema import Strict
from stages.artifacts import external_data_bytes, load_graph
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


@dataclass
class Program:
    """A pt2 model: the ExportedProgram (what is exported) and its module as MLflow loads it (what is run)."""

    program: Any  # torch.export.ExportedProgram
    module: Any  # program.module(): a torch.fx.GraphModule; its .eval() and .train() raise NotImplementedError


def _pt2_path(model_dir: Path) -> Path | None:
    """data/model.pt2 when the model was logged with serialization_format='pt2' (MLflow 3's default)."""
    flavor = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["pytorch"]
    path = model_dir / flavor.get("model_data", "data") / "model.pt2"
    return path if path.is_file() else None


def _load_program(path: Path):
    import torch

    try:
        return torch.export.load(str(path))
    except Exception as exc:  # noqa: BLE001 - a program that does not load is the user's input problem
        raise ModelError(f"model {path.name}: torch.export.load failed: "
                         f"{type(exc).__name__}: {first_line(exc, 200)}") from None


def load(model_dir: Path, options: dict | None = None):
    import mlflow.pytorch

    try:
        model = mlflow.pytorch.load_model(str(model_dir))
    except Exception as exc:  # noqa: BLE001 - a model that does not load is the user's input problem
        raise ModelError(f"model {model_dir}: mlflow.pytorch.load_model failed: {type(exc).__name__}: {exc}") from None
    pt2 = _pt2_path(model_dir)
    if pt2 is not None:
        # MLflow loads a pt2 model without .eval() (its GraphModule refuses it); the program was traced in
        # whatever mode the model was in when logged, and runs so.
        return Program(_load_program(pt2), model)
    if hasattr(model, "eval"):
        model.eval()
    return model


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _program_inputs(program) -> list[dict]:
    """The program's user inputs as recorded at export: name, dtype, shape (-1 for a symbolic dimension)."""
    names = set(program.graph_signature.user_inputs)
    found = []
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in names:
            value = node.meta["val"]
            shape = [d if isinstance(d, int) else -1 for d in value.shape]
            found.append({"name": node.name, "dtype": _dtype_name(value.dtype), "shape": shape})
    return found


def _forward_names(model) -> list[str]:
    """forward()'s positional parameter names, in order."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in params if p.kind in kinds]


def model_inputs(model_dir: Path, options: dict | None = None) -> list[dict] | None:
    """The model's own inputs. pt2: read from the ExportedProgram without running it. pickle: forward()'s
    parameter names, with dtypes and shapes from the MLflow signature (None without one)."""
    pt2 = _pt2_path(model_dir)
    if pt2 is not None:
        return _program_inputs(_load_program(pt2))
    signature = (yaml.safe_load((model_dir / "MLmodel").read_text()).get("signature") or {}).get("inputs")
    if not signature:
        return None
    declared = json.loads(signature)
    if not all(t.get("type") == "tensor" for t in declared):
        return None
    names = _forward_names(load(model_dir, options))[: len(declared)]
    return [{"name": n, "dtype": t["tensor-spec"]["dtype"], "shape": t["tensor-spec"]["shape"]}
            for n, t in zip(names, declared)]


def _call_style(model, spec: ModelSpec) -> str:
    """'kwargs' when forward names every input, else 'args' in the spec's order (a pt2 program: always args,
    its inputs are positional)."""
    if isinstance(model, Program):
        return "args"
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


def _runnable(model):
    """What is called: a pt2 program's module (as MLflow loads it), else the model itself."""
    return model.module if isinstance(model, Program) else model


def predict(model, spec: ModelSpec, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import torch

    tensors = _tensors(spec, feeds)
    style, model = _call_style(model, spec), _runnable(model)
    with torch.inference_mode():
        if style == "kwargs":
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
    model = _runnable(model)

    def call():
        with torch.inference_mode():
            return model(**tensors) if kwargs else model(*ordered)

    return call


def _export_arguments(model, spec: ModelSpec, tensors: dict, output_names: list[str], exporter: str) -> tuple:
    """(what torch.onnx exports, args, kwargs, dynamic_axes). A pt2 model is exported from its ExportedProgram,
    which already carries its dynamic dimensions (torch.onnx ignores dynamic_axes for a program)."""
    if isinstance(model, Program):
        if exporter != "dynamo":
            # torch.onnx sends every ExportedProgram to the dynamo exporter whatever dynamo= says, and the
            # TorchScript tracer cannot run the program's module (its .train()/.eval() raise).
            raise ModelError(f"export.exporter {exporter}: the model is a pt2 torch.export program (MLflow 3's "
                             "default format), which only the dynamo exporter converts; set export.exporter: dynamo")
        return model.program, tuple(tensors[t.name] for t in spec.inputs), None, None
    dynamic_axes = {t.name: t.dynamic_axes() for t in spec.inputs if t.dynamic_axes()}
    if spec.batch_axis_named:
        batch = spec.inputs[0].shape[0]
        dynamic_axes.update({name: {0: batch} for name in output_names})
    if _call_style(model, spec) == "kwargs":
        return model, (), tensors, dynamic_axes or None
    return model, tuple(tensors[t.name] for t in spec.inputs), None, dynamic_axes or None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _export_failure(exc: Exception) -> str:
    """The line that says why: the dynamo exporter opens with generic next steps and puts the cause (e.g. "No
    ONNX function found for aten._linalg_svd") under '## Exception summary'."""
    text = _ANSI.sub("", str(exc))
    if "## Exception summary" in text:
        summary = [line.strip() for line in text.split("## Exception summary", 1)[1].splitlines() if line.strip()]
        if summary:
            line = re.sub(r"^<class '[\w.]+\.(\w+)'>: ", r"\1: ", summary[0])
            return re.sub(r"<OpOverload\(op='([\w.]+)', overload='(\w+)'\)>", r"\1.\2", line)[:300]
    return f"{type(exc).__name__}: {first_line(exc, empty=type(exc).__name__)}"


def _weight_bytes(model) -> int:
    """The bytes of the model's parameters, buffers and constants: what the ONNX graph's initializers will hold,
    so whether torch.onnx must write them as external data (the export step then settles the layout)."""
    if isinstance(model, Program):
        tensors = [*model.program.state_dict.values(), *model.program.constants.values()]
    else:
        tensors = [*model.state_dict(keep_vars=True).values()] if hasattr(model, "state_dict") else []
    return sum(t.numel() * t.element_size() for t in tensors if hasattr(t, "element_size"))


def export_onnx(model, spec: ModelSpec, feeds, output_names: list[str], exporter: str, opset: int, path: Path) -> dict:
    import torch

    tensors = _tensors(spec, feeds)
    # The dynamo exporter names intermediate tensors after the ops that make them (an `embedding` lookup
    # gives a tensor `embedding`), so a requested output name can collide with one (two producers, an
    # invalid graph). It exports under names nothing can share; they are renamed afterwards.
    requested, output_names = output_names, ([f"kiln_output_{i}" for i in range(len(output_names))]
                                             if exporter == "dynamo" else output_names)
    target, args, kwargs, dynamic_axes = _export_arguments(model, spec, tensors, output_names, exporter)
    log = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log):
            warnings.simplefilter("ignore")
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            torch.onnx.export(target, args, str(path), kwargs=kwargs, input_names=[t.name for t in spec.inputs],
                              output_names=output_names, dynamic_axes=dynamic_axes, opset_version=opset,
                              dynamo=exporter == "dynamo", external_data=_weight_bytes(model) > external_data_bytes())
    except Exception as exc:  # noqa: BLE001 - an export failure is the model's (or the recipe's) problem
        hint = "" if isinstance(model, Program) else \
            f" (try export.exporter: {'torchscript' if exporter == 'dynamo' else 'dynamo'})"
        reason = _export_failure(exc)
        raise ModelError(f"export.exporter {exporter}: torch.onnx.export failed: {reason}{hint}") from None
    if output_names != requested:
        import onnx

        graph = load_graph(path)  # renaming needs no weights; the data file stays as torch.onnx wrote it
        rename_outputs(graph, requested)
        onnx.save(graph, str(path))
    done = {"exporter": exporter, "opset": opset, "call": _call_style(model, spec)}
    return {**done, "serialization": "pt2"} if isinstance(model, Program) else done


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
    if isinstance(model, Program):
        return _program_layer_outputs(model, spec, feeds)

    records: list[tuple[str, str, np.ndarray]] = []
    seen: set[str] = set()

    def hook_for(name: str):
        def hook(module, args, output):
            try:
                tensors = _flatten(output)
            except ModelError:  # e.g. a transformer layer's (tensor, None) or a cache object: skip this module,
                return  # not the whole comparison (an error raised in a hook would end the forward pass)
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


def _program_layer_outputs(model: Program, spec: ModelSpec,
                           feeds: dict[str, np.ndarray]) -> list[tuple[str, str, np.ndarray]]:
    """A pt2 module calls no submodules (its graph is flat aten ops, so hooks never fire), but torch.export
    records each op's module stack: a module's output is that of the last op inside it. The graph is run node by
    node (torch.fx's Interpreter) to read those values."""
    import torch
    import torch.fx

    last: dict[str, tuple[int, str, Any]] = {}  # module path -> (op index, module type, that op's node)
    nodes = list(model.module.graph.nodes)
    for index, node in enumerate(nodes):
        if node.op != "call_function":
            continue
        for path, kind in (node.meta.get("nn_module_stack") or {}).values():
            if path:
                last[path] = (index, str(kind).rsplit(".", 1)[-1], node)
    wanted: dict[Any, list[str]] = {}  # a container ends with the op its last child ends with
    for path, (_, _, node) in last.items():
        wanted.setdefault(node, []).append(path)
    values: dict[str, np.ndarray] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            result = super().run_node(node)
            if node in wanted and isinstance(result, torch.Tensor) and result.is_floating_point():
                values.update({path: result.detach().cpu().numpy().copy() for path in wanted[node]})
            return result

    tensors = _tensors(spec, feeds)
    try:
        with torch.inference_mode():
            Recorder(model.module).run(*[tensors[t.name] for t in spec.inputs])
    except Exception:  # noqa: BLE001 - localization is a diagnosis: a graph it cannot step through gives none
        return []
    ordered = sorted(last.items(), key=lambda item: (item[1][0], -item[0].count(".")))  # a child before its parent
    return [(path, kind, values[path]) for path, (_, kind, _) in ordered if path in values]
