"""Bad input exits 2 with one line that names the field, the URI or the tensor."""

from __future__ import annotations

import time

import pytest

from conftest import RECIPES, kiln, write_recipe


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("kiln:")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_typo_key_names_the_field(tmp_path):
    recipe = write_recipe(tmp_path / "typo.yaml", RECIPES / "digits-cnn.yaml", {"exporter: dynamo": "exportr: dynamo"})
    result = kiln("run", str(recipe), "--artifacts", str(tmp_path / "a"))
    assert result.returncode == 2
    assert "export.exportr: unknown key" in _one_error_line(result.stderr)


def test_validate_lists_every_problem(tmp_path):
    recipe = write_recipe(
        tmp_path / "bad.yaml",
        RECIPES / "digits-cnn.yaml",
        {"exporter: dynamo": "exporter: onnxmagic", "opset: 18": "opset: 99", "uri: models:/digits-cnn@champion": "uri: digits"},
    )
    result = kiln("validate", str(recipe))
    assert result.returncode == 2
    for field in ("export.exporter", "export.opset", "source.uri"):
        assert f"{field}:" in result.stderr


def test_latency_gate_on_unmeasured_batch_is_rejected(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: r\nsource: {uri: models:/m@a}\nvalidation: {latency: {batch_sizes: [1]}}\n"
        "gates: {latency: {max_p95_ms: {8: 5.0}}}\n"
    )
    result = kiln("validate", str(recipe))
    assert result.returncode == 2
    assert "batch size 8 is not in validation.latency.batch_sizes" in result.stderr


def test_missing_recipe_file(tmp_path):
    result = kiln("run", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "nope.yaml: no such recipe file" in _one_error_line(result.stderr)


@pytest.mark.slow
def test_missing_model_version_names_the_uri(registry, tmp_path):
    recipe = write_recipe(
        tmp_path / "missing.yaml", RECIPES / "digits-cnn.yaml", {"models:/digits-cnn@champion": "models:/digits-cnn/99"}
    )
    result = kiln("run", str(recipe), "--tracking-uri", registry, "--artifacts", str(tmp_path / "a"))
    assert result.returncode == 2
    assert "models:/digits-cnn/99: version 99 of 'digits-cnn' does not exist" in _one_error_line(result.stderr)


@pytest.mark.slow
def test_missing_alias_names_the_alias(registry, tmp_path):
    recipe = write_recipe(
        tmp_path / "alias.yaml", RECIPES / "digits-cnn.yaml", {"@champion": "@nonexistent"}
    )
    result = kiln("run", str(recipe), "--tracking-uri", registry, "--artifacts", str(tmp_path / "a"))
    assert result.returncode == 2
    assert "no alias 'nonexistent'" in _one_error_line(result.stderr)


def test_unreachable_tracking_uri_names_the_uri(tmp_path):
    started = time.monotonic()
    result = kiln("run", str(RECIPES / "digits-cnn.yaml"), "--tracking-uri", "http://127.0.0.1:9",
                  "--artifacts", str(tmp_path / "a"))
    assert result.returncode == 2
    assert "tracking URI http://127.0.0.1:9: unreachable" in _one_error_line(result.stderr)
    assert time.monotonic() - started < 60  # no minutes of silent retries


@pytest.mark.slow
def test_npz_missing_tensor_names_the_tensor(registry, tmp_path):
    import numpy as np

    np.savez(tmp_path / "data.npz", image=np.zeros((4, 1, 8, 8), np.float32))
    recipe = write_recipe(
        tmp_path / "npz.yaml",
        RECIPES / "digits-cnn.yaml",
        {"source: run_artifact\n    path: validation/digits-test.npz\n    labels: labels":
         "source: npz\n    path: data.npz", "    max_accuracy_drop: 0.005\n": ""},
    )
    result = kiln("run", str(recipe), "--tracking-uri", registry, "--artifacts", str(tmp_path / "a"))
    assert result.returncode == 2, result.stderr
    line = _one_error_line(result.stderr)
    assert "tensor 'pixels' is missing" in line and "data.npz" in line
