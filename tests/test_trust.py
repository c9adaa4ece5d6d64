"""Registry content cannot run code on the builder: pickle-based models are refused unless trusted, a version
whose files change after the first fetch is refused, and `watch` keeps one recipe's bad source to that recipe."""

from __future__ import annotations

import json
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest

from conftest import RECIPES, derive_recipe, kiln
from pipeline.errors import ModelError
from stages.untrusted import check_unchanged, pickle_based, require_trusted


class Payload:
    """Unpickling this touches `marker`: the stand-in for any code a registry could make the builder run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pt2(path: Path) -> Path:
    import torch

    torch.export.save(torch.export.export(torch.nn.Linear(3, 2), (torch.randn(2, 3),)), str(path))
    return path


def test_formats_that_run_code_are_found(tmp_path):
    import torch

    safe = tmp_path / "safe"
    (safe / "data").mkdir(parents=True)
    (safe / "MLmodel").write_text("flavors:\n  pytorch: {code: null, model_data: data}\n")
    _pt2(safe / "data" / "model.pt2")
    (safe / "model.onnx").write_bytes(b"\x08\x07")  # protobuf, not a pickle
    assert pickle_based(safe) == []

    unsafe = tmp_path / "unsafe"
    shutil.copytree(safe, unsafe)
    (unsafe / "MLmodel").write_text("flavors:\n  pytorch: {code: code, model_data: data}\n"
                                    "  sklearn: {serialization_format: cloudpickle, pickled_model: model.pkl}\n")
    (unsafe / "code").mkdir()
    (unsafe / "code" / "m.py").write_text("import os\n")
    torch.save({"w": torch.zeros(2)}, unsafe / "data" / "weights.bin")  # a zip with data.pkl, whatever its name
    (unsafe / "model.pkl").write_bytes(pickle.dumps([1]))
    (unsafe / "blob").write_bytes(pickle.dumps(Payload(tmp_path / "never")))  # pickle opcodes, no suffix
    found = pickle_based(unsafe)
    assert [f.split(" ")[0] for f in found] == ["code/", "model.pkl", "blob", "data/weights.bin"], found

    # A pt2 archive whose sample inputs are a payload: torch.export.load would fall back to a full unpickle.
    archive = zipfile.ZipFile(safe / "data" / "model.pt2")
    tampered = tmp_path / "tampered"
    (tampered / "data").mkdir(parents=True)
    (tampered / "MLmodel").write_text((safe / "MLmodel").read_text())
    with zipfile.ZipFile(tampered / "data" / "model.pt2", "w") as out:
        for name in archive.namelist():
            data = archive.read(name)
            if "/sample_inputs/" in name:
                data = pickle.dumps(Payload(tmp_path / "never"))
            out.writestr(name, data)
    (found,) = pickle_based(tampered)
    assert found.startswith("data/model.pt2") and "sample_inputs" in found
    assert not (tmp_path / "never").exists()  # finding it did not run it

    with pytest.raises(ModelError, match="models:/m/1: model.pkl .* would run code .* safe format .*allow_pickle"):
        require_trusted(_only(unsafe, "model.pkl"), "models:/m/1", False)
    require_trusted(unsafe, "models:/m/1", True)  # trusted: no refusal


def _only(folder: Path, name: str) -> Path:
    single = folder.parent / f"only-{name}"
    single.mkdir()
    shutil.copy(folder / name, single / name)
    return single


def test_first_fetch_record_refuses_changed_files(tmp_path):
    record = tmp_path / "trust" / "fetched.json"
    assert check_unchanged(record, "k", "models:/m/1", {"MLmodel": "a", "model.onnx": "b"}) is True
    assert check_unchanged(record, "k", "models:/m/1", {"MLmodel": "a", "model.onnx": "b"}) is False
    assert check_unchanged(record, "other", "models:/m/2", {"MLmodel": "c"}) is True
    with pytest.raises(ModelError, match=r"models:/m/1: files changed .*\(extra, model.onnx\)"):
        check_unchanged(record, "k", "models:/m/1", {"MLmodel": "a", "model.onnx": "x", "extra": "y"})
    assert set(json.loads(record.read_text())) == {"k", "other"}


def _log_payload(uri: str, marker: Path, artifacts: Path) -> None:
    """Register `payload` v1: an MLflow pytorch model (serialization_format pickle) whose model.pth is a
    payload, the way an attacker with write access to the registry would log it."""
    import mlflow
    import mlflow.pytorch
    import torch

    class Hostile(torch.nn.Module):
        def forward(self, x):
            return x

        def __reduce_ex__(self, protocol):
            return Payload(marker).__reduce__()

    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    signature = ModelSignature(Schema([TensorSpec(np.dtype("float32"), (-1, 4), "x")]),
                               Schema([TensorSpec(np.dtype("float32"), (-1, 4), "y")]))
    experiment = mlflow.create_experiment("payload", artifact_location=artifacts.as_uri())
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.pytorch.log_model(Hostile(), name="model", signature=signature, serialization_format="pickle",
                                        pip_requirements=["torch"])
    mlflow.register_model(info.model_uri, "payload")
    assert not marker.exists()


@pytest.mark.slow
def test_a_pickle_payload_does_not_run_without_opt_in(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    marker = tmp_path / "payload-ran"
    _log_payload(uri, marker, tmp_path / "mlruns")
    recipe = tmp_path / "payload.yaml"
    recipe.write_text("name: payload\nsource: {uri: 'models:/payload/1'}\nserving: {targets: []}\n")
    artifacts = tmp_path / "a"
    result = kiln("run", str(recipe), "--tracking-uri", uri, "--artifacts", str(artifacts))
    assert result.returncode == 2, result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("kiln:")]
    assert "models:/payload/1: data/model.pth" in line and "would run code" in line and "pt2" in line, line
    assert not marker.exists()

    # The registry's copy of the version changes after that first fetch: refused, whatever the store holds.
    (stored,) = (tmp_path / "mlruns").rglob("requirements.txt")
    stored.write_text(stored.read_text() + "evil-package\n")
    shutil.rmtree(artifacts / "store")
    result = kiln("run", str(recipe), "--tracking-uri", uri, "--artifacts", str(artifacts))
    assert result.returncode == 2, result.stderr
    assert "files changed since the version was first fetched (requirements.txt)" in result.stderr
    assert not marker.exists()

    # Trusted through <artifacts>/trust.yaml (a fresh artifacts folder: no record yet): the pickle is loaded.
    trusted = tmp_path / "b"
    trusted.mkdir()
    (trusted / "trust.yaml").write_text("allow_pickle: {models: [payload]}\n")
    kiln("run", str(recipe), "--tracking-uri", uri, "--artifacts", str(trusted))
    assert marker.exists()


@pytest.mark.slow
def test_watch_reports_a_bad_source_for_its_recipe_and_builds_the_others(registry, tmp_path):
    folder = tmp_path / "recipes"
    folder.mkdir()
    small = {"serving": {"targets": []}, "validation": {"latency": {"batch_sizes": [1], "iterations": 100,
                                                                   "target_ci": None}}}
    derive_recipe(folder / "a-empty.yaml", RECIPES / "digits-cnn.yaml",
                  {"name": "empty", "source": {"uri": "models:/never-registered/latest"}, **small})
    derive_recipe(folder / "b-good.yaml", RECIPES / "digits-cnn.yaml", {"name": "good", **small})
    result = kiln("watch", "--once", str(folder), "--tracking-uri", registry, "--artifacts", str(tmp_path / "a"))
    assert result.returncode == 0, result.stderr
    assert "a-empty.yaml: source.uri models:/never-registered/latest: registered model 'never-registered' has " \
           "no versions" in result.stderr
    assert "unreachable" not in result.stderr
    assert "kiln watch: good|digits-cnn|1: passed" in result.stderr, result.stderr
