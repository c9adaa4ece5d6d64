"""Against a real `mlflow server` on 127.0.0.1: models registered over HTTP, artifacts served by the server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import RECIPES, kiln, register_examples, run_json, steps_by_status, write_recipe

pytestmark = [pytest.mark.slow, pytest.mark.server]


@pytest.fixture(scope="module")
def served(mlflow_server, tmp_path_factory):
    register_examples(mlflow_server, tmp_path_factory.mktemp("register-home"))
    return mlflow_server


def test_recipes_build_from_a_tracking_server(served, tmp_path):
    artifacts = tmp_path / "artifacts"
    result, summary = run_json(str(RECIPES), "--tracking-uri", served, "--artifacts", str(artifacts))
    assert result.returncode == 0, result.stderr
    for outcome in summary["recipes"]:
        assert outcome["status"] == "passed"
        manifest = json.loads((Path(outcome["bundle"]) / "manifest.json").read_text())
        assert manifest["gates"]["passed"]
        assert manifest["source"]["name"] == outcome["recipe"]
    fetch = json.loads(Path(summary["recipes"][0]["bundle"], "manifest.json").read_text())["steps"][0]
    assert fetch["stage"] == "fetch" and fetch["summary"]["files"] >= 3
    again, summary = run_json(str(RECIPES), "--tracking-uri", served, "--artifacts", str(artifacts))
    assert again.returncode == 0 and steps_by_status(summary, "ran") == []


def test_recipe_tracking_uri_is_used(served, tmp_path):
    recipe = write_recipe(
        tmp_path / "r.yaml", RECIPES / "digits-cnn.yaml",
        {"uri: models:/digits-cnn@champion": f"uri: models:/digits-cnn/1\n  tracking_uri: {served}"},
    )
    result = kiln("plan", str(recipe), "--artifacts", str(tmp_path / "a"))
    assert result.returncode == 0, result.stderr
    assert "models:/digits-cnn/1 -> v1" in result.stdout


def test_missing_version_on_server_exits_2(served, tmp_path):
    recipe = write_recipe(
        tmp_path / "r.yaml", RECIPES / "digits-cnn.yaml", {"models:/digits-cnn@champion": "models:/digits-cnn/42"}
    )
    result = kiln("run", str(recipe), "--tracking-uri", served, "--artifacts", str(tmp_path / "a"))
    assert result.returncode == 2
    assert f"models:/digits-cnn/42: version 42 of 'digits-cnn' does not exist at {served}" in result.stderr
