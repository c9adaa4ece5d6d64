"""The stage spec: a stage or a serving target is one module plus one registry line; the planner derives the DAG
from what stages declare and refuses what they misdeclare; the engine reaches the stages through one module."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import RECIPES, ROOT, base_env, derive_recipe

PIPELINE = ROOT / "pipeline"
MAX_LINES = 60


def _kiln_with(registrations: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real CLI in a fresh interpreter that first runs the given registry lines (as a plugin would)."""
    code = f"import stages, stages.targets\n{registrations}\nfrom pipeline.cli import main\nmain({list(args)!r})"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**(env or base_env()), "PYTHONPATH": str(ROOT / "tests")})


TOY = ("stages.STAGES['opcount'] = 'fixtures.toy_stage'\n"
       "stages.targets.TARGETS['toy'] = 'fixtures.toy_target'")


def test_a_toy_stage_and_target_are_one_module_and_one_line_each(registry, tmp_path):
    recipe = derive_recipe(tmp_path / "toy.yaml", RECIPES / "digits-cnn.yaml",
                           {"name": "digits-toy", "serving": {"targets": ["triton", "toy"], "toy": {"greeting": "hi"}}})
    artifacts = str(tmp_path / "a")
    planned = _kiln_with(TOY, "plan", str(recipe), "--tracking-uri", registry, "--artifacts", artifacts, "--json")
    assert planned.returncode == 0, planned.stderr
    steps = json.loads(planned.stdout)
    assert steps["digits-toy:opcount"]["stage"] == "opcount"
    assert steps["digits-toy:serve.toy"]["stage"] == "serve.toy"
    text = _kiln_with(TOY, "plan", str(recipe), "--tracking-uri", registry, "--artifacts", artifacts)
    assert "opcount" in text.stdout and "<- digits-toy:optimize" in text.stdout, text.stdout
    # And it builds: the toy stage's output is in the store, the toy target's file in the bundle. In-process, since
    # the registry lines above run only in this interpreter (a line in stages/__init__.py reaches every worker).
    built = _kiln_with(TOY, "run", str(recipe), "--tracking-uri", registry, "--artifacts", artifacts, "--json",
                       "--executor", "inline")
    assert built.returncode == 0, built.stderr[-2000:]
    bundle = tmp_path / "a" / "bundles" / "digits-toy" / "v1"
    assert (bundle / "serving" / "toy" / "served.txt").read_text().startswith("hi digits-toy v1: pixels")
    ops = [json.loads(p.read_text()) for p in (tmp_path / "a" / "store").rglob("ops.json")]
    assert len(ops) == 1 and 0 < len(ops[0]) <= 5 and all(n > 0 for n in ops[0].values())


def test_without_its_registry_line_a_target_is_an_unknown_value(tmp_path):
    recipe = derive_recipe(tmp_path / "toy.yaml", RECIPES / "digits-cnn.yaml", {"serving": {"targets": ["toy"]}})
    result = _kiln_with("", "validate", str(recipe))
    assert result.returncode == 2 and "serving.targets.0:" in result.stderr, result.stderr


def test_a_wrongly_typed_stage_config_is_refused_at_plan_time(registry, tmp_path):
    recipe = derive_recipe(tmp_path / "r.yaml", RECIPES / "digits-cnn.yaml", {"name": "digits-typed"})
    result = _kiln_with("stages.STAGES['opcount'] = 'fixtures.toy_mistyped_stage'", "run", str(recipe),
                        "--tracking-uri", registry, "--artifacts", str(tmp_path / "a"))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("kiln:")]
    assert len(lines) == 1 and "step opcount: top: Input should be a valid integer" in lines[0], result.stderr
    assert not (tmp_path / "a" / "store").exists() or not any((tmp_path / "a" / "store").rglob("meta.json"))


# --- the engine's shape, checked from the source ---------------------------------------------------------------

def _modules(folder: Path) -> dict[str, ast.Module]:
    found = {}
    for path in sorted(folder.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(), str(path))
    return found


def _imports(tree: ast.Module, module: str, known: set[str]) -> set[str]:
    """Every module of `known` this one imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name in known or name.split(".")[0] == "stages"} - {module}


def test_only_the_registry_imports_stages():
    engine = _modules(PIPELINE)
    offenders = {m: sorted(i for i in _imports(t, m, set(engine)) if i.split(".")[0] == "stages")
                 for m, t in engine.items() if m != "pipeline.registry"}
    assert {m: i for m, i in offenders.items() if i} == {}


def test_no_import_cycle_among_pipeline_modules():
    engine = _modules(PIPELINE)
    edges = {m: {i for i in _imports(t, m, set(engine)) if i in engine} for m, t in engine.items()}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        for nxt in sorted(edges[module]):
            if nxt in path:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif len(path) < len(edges):
                visit(nxt, path + [nxt])

    for start in sorted(edges):
        visit(start, [start])
    assert cycles == []


@pytest.mark.parametrize("folder", ["pipeline", "stages"])
def test_no_function_over_60_lines(folder):
    long = [f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
            for name, tree in _modules(ROOT / folder).items() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_LINES]
    assert long == []


def test_only_the_models_own_framework_options_key_its_export(tmp_path):
    """The PyTorch exporter is a field of `export`, but a TensorFlow model's export is not keyed on it."""
    from pipeline import registry

    config = registry.stage("export").Config(opset=18, exporter="torchscript", source_options={})
    keys = {}
    for flavor in ("pytorch", "tensorflow"):
        folder = tmp_path / flavor
        folder.mkdir()
        (folder / "source.json").write_text(json.dumps({"flavor": flavor}))
        keys[flavor] = registry.keyed_config("export", config, {"model": folder})
    assert keys["pytorch"]["exporter"] == "torchscript" and keys["pytorch"]["opset"] == 18
    assert "exporter" not in keys["tensorflow"] and keys["tensorflow"]["opset"] == 18


def test_the_planner_refuses_an_input_of_the_wrong_kind(tmp_path):
    """A step that reads validate's metrics as if it were a model is a planning error naming both steps."""
    from pipeline.errors import RecipeError
    from pipeline.mlflow_registry import SourceRef
    from pipeline.plan import Graph
    from pipeline.recipe import load_recipe

    recipe = load_recipe(RECIPES / "digits-cnn.yaml")
    graph = Graph(recipe, RECIPES / "digits-cnn.yaml", SourceRef("models:/m/1", "sqlite://", "m", "1", None, "", 0),
                  tmp_path)
    graph.add("fetch", {"source": {"name": "m", "version": "1", "run_id": None, "model_source": "", "created": 0}})
    graph.add("data", {"data": {"source": "synthetic"}}, {"model": "fetch"})
    graph.add("optimize", {"level": "basic"}, {"onnx": "data"})
    with pytest.raises(RecipeError, match="step optimize wants onnx as 'onnx', but data makes samples"):
        graph.ordered()
    with pytest.raises(RecipeError, match="step quantize.x: variant: Input tag .int4."):
        graph.add("quantize.x", {"variant": {"name": "x", "kind": "int4"}, "gates": {}, "level": "basic"})
    with pytest.raises(RecipeError, match="input 'weights' is not one its stage declares"):
        graph.add("export", {"opset": 18}, {"weights": "fetch"})
    with pytest.raises(RecipeError, match="step 'exprot': no such stage"):
        graph.add("exprot", {"opset": 18}, {"model": "fetch"})
