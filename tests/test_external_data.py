"""ONNX external data: models too large for one protobuf keep their initializers in `model.onnx.data` beside
`model.onnx`. The threshold is lowered (KILN_EXTERNAL_DATA_BYTES) so small models take the same path: the
layout helpers, ONNX Runtime's offline optimization, fusion, quantization and FP16 on such models (fast, in
process), and a whole build through the real `kiln run` (slow; its bundle is also served by the real Triton and
TorchServe in tests/test_serving_triton.py and tests/test_serving_torchserve.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import EXTERNAL_DATA_BYTES, derive_recipe, run_json, steps_by_status
from stages import artifacts, fallback, localize, onnx_runtime, optimize, quantize

ENV = artifacts.EXTERNAL_DATA_ENV


def _mlp(path: Path, hidden: int = 64) -> dict[str, np.ndarray]:
    """x[batch, 32] -> MatMul -> Add -> Relu -> MatMul -> y[batch, 8], saved inline; returns a feed."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("w1", (32, hidden)), ("b1", (hidden,)), ("w2", (hidden, 8)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="bias1"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu1"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return {"x": rng.standard_normal((4, 32)).astype(np.float32)}


def _run(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return onnx_runtime.run(onnx_runtime.session(path), feeds)[0]


def _locations(path: Path) -> set[str]:
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    graph = artifacts.load_graph(path).graph
    return {ExternalDataInfo(t).location for t in graph.initializer if uses_external_data(t)}


def test_threshold_setting_and_cache_key(monkeypatch):
    from pipeline import registry

    config = optimize.Config(level="basic")
    monkeypatch.delenv(ENV, raising=False)
    assert artifacts.external_data_bytes() == artifacts.EXTERNAL_DATA_BYTES < 2**31
    default_key = registry.keyed_config("optimize", config, {})
    assert default_key == config.model_dump(mode="json")  # keys built without the override are unchanged
    monkeypatch.setenv(ENV, "4096")
    lowered = registry.keyed_config("optimize", config, {})
    assert lowered["onnx_external_data_bytes"] == 4096 and lowered != default_key
    assert artifacts.layout_key(artifacts.METRICS) == {}  # steps that write no ONNX keep their keys
    monkeypatch.setenv(ENV, "lots")
    with pytest.raises(Exception, match=r"KILN_EXTERNAL_DATA_BYTES: 'lots' is not a number of bytes"):
        artifacts.external_data_bytes()


def test_settle_copy_and_remove_follow_the_threshold(tmp_path, monkeypatch):
    import onnx

    model = tmp_path / "a" / "model.onnx"
    model.parent.mkdir()
    feeds = _mlp(model)
    expected = _run(model, feeds)
    monkeypatch.setenv(ENV, "4096")
    assert artifacts.settle_onnx(model) is True  # 8 KiB of w1 is over 4 KiB: out to model.onnx.data
    assert _locations(model) == {"model.onnx.data"} and model.stat().st_size < 1024
    np.testing.assert_array_equal(_run(model, feeds), expected)
    # a tool that wrote a file per tensor (the TorchScript exporter does) ends with one data file
    proto = onnx.load(str(model))
    artifacts.data_file(model).unlink()
    onnx.save(proto, str(model), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    assert len(_locations(model)) == 3
    assert artifacts.settle_onnx(model) is True
    assert sorted(p.name for p in model.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    copy = tmp_path / "b" / "model.onnx"
    copy.parent.mkdir()
    artifacts.copy_onnx(model, copy)
    np.testing.assert_array_equal(_run(copy, feeds), expected)
    assert artifacts.onnx_bytes(copy) == artifacts.onnx_bytes(model) > model.stat().st_size
    monkeypatch.delenv(ENV)
    assert artifacts.settle_onnx(copy) is False  # below the default threshold: back to one file
    assert [p.name for p in copy.parent.iterdir()] == ["model.onnx"] and not _locations(copy)
    np.testing.assert_array_equal(_run(copy, feeds), expected)
    artifacts.remove_onnx(model)
    assert not any(model.parent.iterdir())


def test_optimize_quantize_fp16_and_localize_on_external_data(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, "4096")
    exported = tmp_path / "export"
    exported.mkdir()
    feeds = _mlp(artifacts.onnx_model(exported), hidden=256)
    artifacts.settle_onnx(artifacts.onnx_model(exported))
    expected = _run(artifacts.onnx_model(exported), feeds)
    out = tmp_path / "optimize"
    out.mkdir()
    config = optimize.Config.model_validate({"level": "extended", "transformer": {"model_type": "bert"}})
    summary = optimize.run(config, {"onnx": exported}, out, {})
    assert summary["external_data"] == "model.onnx.data" and summary["bytes"] > 256 * 32 * 4
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.data", "quantizable.onnx",
                                                     "quantizable.onnx.data"]  # fusion's temporary file is gone
    np.testing.assert_allclose(_run(artifacts.onnx_model(out), feeds), expected, rtol=1e-5, atol=1e-5)
    for kind, variant, tolerance in (
        ("int8-dynamic", quantize.Int8DynamicVariant(name="int8", kind="int8-dynamic", reduce_range=True), 0.5),
        ("fp16", quantize.Fp16Variant(name="half", kind="fp16"), 0.05),
        ("weight-only", quantize.WeightOnlyVariant(name="wo", kind="weight-only"), 0.05),
    ):
        target = tmp_path / kind / "model.onnx"
        target.parent.mkdir()
        for _ in range(2):  # a second round (the fallback re-quantizes) must not grow the data file
            quantize._quantize(kind, variant, artifacts.quantizable(out), target, None, True, [])
            onnx_runtime.optimize_offline(target, target.with_name("final.onnx"), "basic")
        first = artifacts.onnx_bytes(target)
        quantize._quantize(kind, variant, artifacts.quantizable(out), target, None, True, [])
        assert artifacts.onnx_bytes(target) == first
        final = target.with_name("final.onnx")
        assert _locations(final) == {"final.onnx.data"}
        np.testing.assert_allclose(_run(final, feeds), expected, atol=tolerance * np.abs(expected).max())
        # a quantized model written with external data but under the threshold, optimized into another folder
        # (quantize's raw model sits beside the step's out/): one self-contained file there
        monkeypatch.setenv(ENV, str(2 * artifacts.onnx_bytes(target)))
        elsewhere = tmp_path / kind / "out" / "model.onnx"
        elsewhere.parent.mkdir()
        onnx_runtime.optimize_offline(target, elsewhere, "basic")
        assert [p.name for p in elsewhere.parent.iterdir()] == ["model.onnx"] and not _locations(elsewhere)
        np.testing.assert_allclose(_run(elsewhere, feeds), _run(final, feeds), rtol=1e-6)
        monkeypatch.setenv(ENV, "4096")
    tensors = localize.onnx_tensors(artifacts.onnx_model(exported), feeds)  # ONNX Runtime from memory + folder
    assert {"h", "r", "y"} <= set(tensors)
    np.testing.assert_allclose(tensors["y"], expected, rtol=1e-6)
    # the fallback's candidates on a model with external data: what the quantizer changed, and the SQNR pass
    quantized = tmp_path / "int8-dynamic" / "model.onnx"
    source = artifacts.load_graph(artifacts.quantizable(out)).graph
    changed = fallback.changed_nodes(source, artifacts.load_graph(quantized).graph)
    noise = quantize.added_noise(artifacts.quantizable(out), quantized, feeds, changed, source)
    assert changed and noise and set(noise) <= {n.name for n in changed}


# --- slow: the real `kiln run` ------------------------------------------------------------------------------


@pytest.mark.slow
def test_bundle_carries_model_and_data_file_and_passes_parity(external_bundle):
    import onnx

    bundle = external_bundle["bundle"]
    print(f"\nexternal-data digits-cnn build: {external_bundle['seconds']:.1f} s")
    manifest = json.loads((bundle / "manifest.json").read_text())
    model, data = bundle / "model.onnx", bundle / "model.onnx.data"
    assert manifest["model"]["file"] == "model.onnx" and manifest["model"]["data_file"] == "model.onnx.data"
    for path in (model, data):  # both listed, with their real hashes
        entry = manifest["files"][path.name]
        assert entry == {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "bytes": path.stat().st_size}
    weights = sum(t.dims[0] * int(np.prod(t.dims[1:])) * 4 for t in onnx.load(str(model), load_external_data=False)
                  .graph.initializer if onnx.external_data_helper.uses_external_data(t))
    assert data.stat().st_size >= weights > 10 * EXTERNAL_DATA_BYTES > model.stat().st_size
    assert _locations(model) == {"model.onnx.data"}
    assert manifest["gates"]["passed"] and manifest["metrics"]["outputs"]["logits"]["cosine"] > 0.9999
    steps = {s["stage"]: s["summary"] for s in manifest["steps"]}
    assert steps["export"]["external_data"] == "model.onnx.data"
    with np.load(bundle / "sample_inputs.npz") as x, np.load(bundle / "sample_outputs.npz") as y:
        np.testing.assert_allclose(_run(model, dict(x)), y["logits"], atol=1e-5)
    int8 = next(v for v in manifest["variants"] if v["name"] == "int8")
    assert int8["passed"] and int8["bytes"] < manifest["files"]["model.onnx.data"]["bytes"]
    for target in ("triton", "torchserve"):
        assert not manifest["serving"][target].get("skipped")
    version = manifest["source"]["version"]
    folder = bundle / "serving/triton/digits-ext" / str(version)
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert (folder / "model.onnx.data").read_bytes() == data.read_bytes()


@pytest.mark.slow
def test_default_threshold_does_not_reuse_steps_of_the_external_layout(external_bundle, registry):
    """The same recipe without the override, in the same store: fetch and data are reused, every step that
    writes ONNX runs again (its key has no threshold now), and the bundle is one self-contained model.onnx."""
    tmp = external_bundle["tmp"]
    recipe = derive_recipe(tmp / "digits-ext-default.yaml", tmp / "digits-ext.yaml",
                           {"publish": {"dest": str(tmp / "default-bundles")}, "serving": {"targets": []}})
    result, summary = run_json(str(recipe), "--tracking-uri", registry, "--artifacts", str(external_bundle["artifacts"]))
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"digits-ext:fetch", "digits-ext:data"} <= set(steps_by_status(summary, "cached"))
    assert {"digits-ext:export", "digits-ext:optimize", "digits-ext:quantize.int8"} <= set(steps_by_status(summary, "ran"))
    bundle = Path(summary["recipes"][0]["bundle"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["model"]["data_file"] is None and not list(bundle.rglob("*.data"))
    assert not _locations(bundle / "model.onnx") and manifest["gates"]["passed"]
