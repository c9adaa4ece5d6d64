from __future__ import annotations

import json

import re

import yaml

from conftest import RECIPES, ROOT, kiln
from pipeline.recipe import Recipe, json_schema, load_recipe


def test_example_recipes_are_valid():
    for path in sorted([*RECIPES.glob("*.yaml"), *RECIPES.glob("tuned/*.yaml")]):
        recipe = load_recipe(path)
        assert recipe.source.uri.startswith("models:/")


def test_readme_recipes_are_valid():
    """Users copy the README's recipes: each YAML block with a `source` must be a recipe kiln accepts."""
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)]
    recipes = [b for b in blocks if isinstance(b, dict) and "source" in b]
    assert len(recipes) >= 6  # the shortest recipe per flavor and the full example
    for block in recipes:
        Recipe.model_validate(block)


def test_cli_validate_and_schema():
    result = kiln("validate", str(RECIPES), str(RECIPES / "tuned"))
    assert result.returncode == 0, result.stderr
    schema = json.loads(kiln("schema").stdout)
    assert schema["title"] == "Recipe"
    assert schema["additionalProperties"] is False
    assert schema == json_schema()
    assert {"TritonTarget", "TorchServeTarget", "TfServingTarget", "Optimize", "Export"} <= set(schema["$defs"])


def test_version_uri_and_defaults():
    recipe = Recipe.model_validate({"name": "m", "source": {"uri": "models:/m/3"}})
    assert recipe.export.exporter == "dynamo"
    assert recipe.validation.latency.iterations == 10 and recipe.validation.latency.target_ci == 0.05
