from __future__ import annotations

import json

from conftest import RECIPES, kiln
from pipeline.recipe import Recipe, json_schema, load_recipe


def test_example_recipes_are_valid():
    for path in sorted([*RECIPES.glob("*.yaml"), *RECIPES.glob("tuned/*.yaml")]):
        recipe = load_recipe(path)
        assert recipe.source.uri.startswith("models:/")


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
    assert recipe.validation.latency.iterations >= 100
