"""The accuracy-aware fallback's parts: what the quantizer changed in a real ONNX Runtime-quantized graph, the roles
and units the candidates are made of, and the search's choices on a model whose error is known exactly."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from stages import fallback
from stages.calibration import CalibrationReader


def _conv_net(path):
    """input -> [Conv -> Relu] x 2 (scoped like a torch export) -> GlobalAveragePool -> Flatten -> Gemm."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name) for name, shape in
               (("w0", (8, 3, 3, 3)), ("w1", (8, 8, 3, 3)), ("fc", (8, 4)))]
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], name="/layer.0/conv/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"], name="/layer.0/relu/Relu"),
        helper.make_node("Conv", ["r0", "w1"], ["c1"], name="/layer.1/conv/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="/layer.1/relu/Relu"),
        helper.make_node("GlobalAveragePool", ["r1"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc"], ["y"], name="head"),
    ]
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return rng.standard_normal((16, 3, 8, 8)).astype(np.float32)


def test_changed_nodes_units_and_roles_of_a_static_qdq_graph(tmp_path):
    from onnxruntime.quantization import QuantFormat, quantize_static

    source, target = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    images = _conv_net(source)
    quantize_static(source, target, CalibrationReader({"x": images}), quant_format=QuantFormat.QDQ,
                    per_channel=True)
    graph = onnx.load(str(source)).graph
    changed = fallback.changed_nodes(graph, onnx.load(str(target)).graph)
    names = {n.name for n in changed}
    # the convs, their relus and the head are fed by DequantizeLinear now; Flatten/pool too where QDQ'd
    assert {"/layer.0/conv/Conv", "/layer.1/conv/Conv", "/layer.0/relu/Relu", "head"} <= names
    role = fallback.roles(graph, changed)
    assert role["/layer.0/conv/Conv"] == role["/layer.1/conv/Conv"] == "/layer.*/conv/Conv"
    assert role["head"] == "Gemm after Flatten"
    units = {u["node"]: u for u in fallback.units(graph, changed, role)}
    # a Conv and the Relu after it are one candidate: QDQ quantizes the tensor between them
    assert units["/layer.0/conv/Conv"]["nodes"] == ["/layer.0/conv/Conv", "/layer.0/relu/Relu"]
    assert "/layer.0/relu/Relu" not in units and units["head"]["nodes"] == ["head"]


def test_changed_nodes_of_a_dynamic_graph_are_every_op_the_quantizer_replaced(tmp_path):
    from onnxruntime.quantization import quantize_dynamic

    rng = np.random.default_rng(1)
    conv = numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "k")
    weight = numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "k"], ["c"], name="/stem/conv/Conv"),
             helper.make_node("GlobalAveragePool", ["c"], ["p"], name="/stem/pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="/stem/flatten"),
             helper.make_node("MatMul", ["f", "w"], ["y"], name="/encoder/layer.0/dense/MatMul")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 16])], [conv, weight])
    source, target = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source)
    quantize_dynamic(source, target)
    changed = {n.name: n.op_type for n in fallback.changed_nodes(onnx.load(str(source)).graph,
                                                                   onnx.load(str(target)).graph)}
    # ConvInteger and MatMulInteger took their places; the pooling and flatten stay float and are no candidates
    assert changed == {"/stem/conv/Conv": "Conv", "/encoder/layer.0/dense/MatMul": "MatMul"}


class _KnownError:
    """A model whose error is a known sum over the nodes still quantized: the search's choices can be checked
    exactly. `noisy` adds a lot of noise of its own (SQNR ranks it first) but no error at the output."""

    cost = {"ffn.0": 0.040, "ffn.1": 0.006, "ffn.2": 0.006, "attn.0": 0.002, "attn.1": 0.002, "noisy": 0.0}
    gate = 0.017

    def __init__(self):
        self.built: list[str] = []
        self.kept: list[int] = []

    def error(self, excluded) -> float:
        return 0.001 + sum(c for n, c in self.cost.items() if n not in excluded)

    def build(self, excluded):
        self.built = list(excluded)

    def judge(self):
        error = self.error(self.built)
        passed = error <= self.gate
        found = [{"check": "error", "passed": passed, "message": "" if passed else f"error {error} above {self.gate}"}]
        return found, {"y": {"cosine": 1 - error}}, error

    def hooks(self) -> fallback.Hooks:
        return fallback.Hooks(build=self.build, judge=self.judge, probe=self.error, keep=self.kept.append,
                              time=lambda rounds: {r: 10.0 - r for r in rounds})


def _units(model: _KnownError) -> list[dict]:
    return [{"node": n, "op": "MatMul", "role": n.split(".")[0], "nodes": [n], "ops": ["MatMul"]} for n in model.cost]


def test_search_keeps_in_float_what_matters_end_to_end_not_the_noisiest():
    model = _KnownError()
    model.build([])
    found, measured, error = model.judge()
    record = fallback.search(fallback.Fallback(max_excluded_fraction=1.0), _units(model), found, measured, error,
                             model.hooks(), noise={"noisy": 1.0})
    # ffn.0 alone brings 0.047 to 0.007: the gates pass with one node in float; 'noisy' is never tried
    assert record["excluded"] == ["ffn.0"] and record["stopped"] is None
    assert model.built == ["ffn.0"]  # the model left built is the passing one
    curve = record["curve"]
    assert [p["round"] for p in curve] == [0, 1] and curve[1]["passed"] and curve[1]["added"][0]["node"] == "ffn.0"
    assert curve[0]["p50_ms_b1"] == 10.0 and curve[1]["p50_ms_b1"] == 9.0  # kept rounds timed side by side
    assert record["cost"]["probes"] >= len(model.cost)


def test_search_stops_at_its_budget_and_says_which():
    model = _KnownError()
    model.gate = 0.002  # needs every costly node in float: 5 of 6
    model.build([])
    found, measured, error = model.judge()
    record = fallback.search(fallback.Fallback(max_excluded_fraction=0.5), _units(model), found, measured, error,
                             model.hooks(), noise={})
    assert record["stopped"].startswith("budget used: max_excluded_fraction 0.5 (3 of 6")
    assert record["excluded"][0] == "ffn.0" and len(record["excluded"]) == 3 and not record["found"][0]["passed"]
    again = fallback.search(fallback.Fallback(max_excluded_fraction=1.0, max_rounds=2), _units(model), found,
                            measured, error, model.hooks(), noise={})
    assert again["stopped"] == "budget used: max_rounds 2" and len(again["curve"]) == 3


def test_once_the_gates_pass_each_float_node_is_tried_quantized_again():
    model = _KnownError()
    model.gate = 0.0011  # every costly node is needed in float
    model.build([])
    found, measured, error = model.judge()
    record = fallback.search(fallback.Fallback(max_excluded_fraction=1.0), _units(model), found, measured, error,
                             model.hooks(), noise={})
    assert sorted(record["excluded"]) == ["attn.0", "attn.1", "ffn.0", "ffn.1", "ffn.2"] and record["stopped"] is None
    trims = [p for p in record["curve"] if p.get("removed")]
    # latest first; each is needed, so each trim fails and the passing model is rebuilt
    assert [p["removed"][0]["node"] for p in trims] == list(reversed(record["excluded"]))
    assert not any(p["kept"] for p in trims) and sorted(model.built) == sorted(record["excluded"])
