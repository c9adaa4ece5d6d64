"""TorchServe handler that kiln packs into the .mar: ONNX Runtime on the bundled model.onnx (and its
model.onnx.data, for a model too large for one protobuf: ONNX Runtime reads it from beside model.onnx).

Runs inside the TorchServe worker, so it imports only numpy and onnxruntime. TorchServe hands `handle` up to
batchSize requests at once (model-config.yaml); each is answered on its own, in order:

- JSON (`Content-Type: application/json`): {"inputs": {"<input>": nested lists, ...}} ->
  {"outputs": {"<output>": nested lists, ...}}. The first axis is the request's own batch (one or more rows).
- raw tensors (any other content type): the body is a .npz file with one array per input (or a bare .npy file
  when the model has one input) -> a .npz file with one array per output.

Requests whose non-batch shapes agree run as one ONNX Runtime call; the `X-Kiln-Batch-Requests` response header
says how many requests shared that call (1 = no batching happened). A malformed request gets a 400 response
that names the tensor; the other requests of its batch are still served.

TorchServe loads the only class defined in this module (no other classes may be defined here).
"""

import io
import json
import os
import zipfile

import numpy as np
import onnxruntime as ort

SPEC_FILE = "kiln_handler.json"  # written by kiln next to the model in the .mar


class OnnxRuntimeHandler:
    def __init__(self):
        self.session = None
        self.spec = None
        self.initialized = False

    def initialize(self, context):
        model_dir = context.system_properties["model_dir"]
        with open(os.path.join(model_dir, SPEC_FILE)) as handle:
            self.spec = json.load(handle)
        # Exactly the session settings the model was validated (and tuned) with.
        session = self.spec["session"]
        chosen = session["session_options"]
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, chosen["graph_optimization_level"])
        options.intra_op_num_threads = int(chosen["intra_op_num_threads"])
        options.inter_op_num_threads = int(chosen["inter_op_num_threads"])
        options.execution_mode = getattr(ort.ExecutionMode, chosen["execution_mode"])
        model_file = context.manifest["model"]["serializedFile"]
        data_file = self.spec.get("data_file")  # a large model's weights, extracted beside it from the .mar
        if data_file and not os.path.isfile(os.path.join(model_dir, data_file)):
            raise FileNotFoundError(f"{data_file} (the weights of {model_file}) is missing from {model_dir}")
        self.session = ort.InferenceSession(os.path.join(model_dir, model_file), options,
                                            providers=session["providers"], provider_options=session["provider_options"])
        self.initialized = True

    def handle(self, data, context):
        responses = [None] * len(data)
        parsed = {}  # request index -> (feeds, raw?)
        for idx, request in enumerate(data):
            try:
                parsed[idx] = self._parse(request)
            except ValueError as error:
                responses[idx] = self._refuse(context, idx, str(error))
        pending = self._groups(parsed)
        while pending:
            group = pending.pop()
            try:
                results = self._run([parsed[i][0] for i in group])
            except Exception as error:  # noqa: BLE001 - ONNX Runtime refused these inputs
                if len(group) > 1:
                    pending.extend([i] for i in group)  # one by one, so that only the request at fault fails
                else:
                    reason = str(error).strip().splitlines()[0][:300]
                    responses[group[0]] = self._refuse(context, group[0], f"the model cannot run this request: {reason}")
                continue
            for i, result in zip(group, results):
                context.set_response_header(i, "X-Kiln-Batch-Requests", str(len(group)))
                if parsed[i][1]:
                    buffer = io.BytesIO()
                    np.savez(buffer, **result)
                    context.set_response_content_type(i, "application/octet-stream")
                    responses[i] = buffer.getvalue()
                else:
                    context.set_response_content_type(i, "application/json")
                    responses[i] = {"outputs": {name: array.tolist() for name, array in result.items()}}
        return responses

    @staticmethod
    def _refuse(context, idx, message):
        context.set_response_status(400, message, idx)
        context.set_response_content_type(idx, "application/json")
        return {"error": message}

    # --- requests -> arrays ---------------------------------------------------------------------------------

    def _parse(self, request):
        body = request.get("data") if request.get("data") is not None else request.get("body")
        if body is None:
            raise ValueError("empty request: send JSON {\"inputs\": {...}} or a .npz/.npy body")
        raw = False
        if isinstance(body, (bytes, bytearray)):
            content = bytes(body)
            if content[:6] == b"\x93NUMPY" or content[:4] == b"PK\x03\x04":
                raw = True
                arrays = self._load_numpy(content)
            else:
                try:
                    body = json.loads(content)
                except (UnicodeDecodeError, json.JSONDecodeError):
                    raise ValueError("the body is neither JSON nor a .npy/.npz file") from None
        if not raw:
            if not isinstance(body, dict) or not isinstance(body.get("inputs"), dict):
                raise ValueError("a JSON request is {\"inputs\": {\"<input name>\": nested lists}}")
            arrays = body["inputs"]
        return self._check(arrays), raw

    def _load_numpy(self, content):
        with io.BytesIO(content) as buffer:
            try:
                loaded = np.load(buffer, allow_pickle=False)
            except (OSError, EOFError, ValueError, zipfile.BadZipFile) as error:
                raise ValueError(f"the body is not a readable .npy/.npz file: {error}") from None
            if isinstance(loaded, np.ndarray):
                if len(self.spec["inputs"]) != 1:
                    names = ", ".join(t["name"] for t in self.spec["inputs"])
                    raise ValueError(f"this model has several inputs ({names}): send a .npz with one array per input")
                return {self.spec["inputs"][0]["name"]: loaded}
            with loaded:
                return {name: loaded[name] for name in loaded.files}

    def _check(self, arrays):
        feeds = {}
        named = {}  # dynamic axis name -> (size, input that set it)
        for tensor in self.spec["inputs"]:
            name = tensor["name"]
            if name not in arrays:
                raise ValueError(f"input '{name}' is missing")
            try:
                array = np.asarray(arrays[name], dtype=tensor["dtype"])
            except (TypeError, ValueError):
                raise ValueError(f"input '{name}' is not a {tensor['dtype']} tensor") from None
            shape = tensor["shape"]
            if array.ndim != len(shape):
                raise ValueError(f"input '{name}' has rank {array.ndim}, expected {len(shape)} (shape {shape})")
            for axis, size in enumerate(shape):
                if isinstance(size, int) and array.shape[axis] != size:
                    raise ValueError(f"input '{name}' axis {axis} is {array.shape[axis]}, expected {size}")
                if isinstance(size, str):
                    seen, other = named.setdefault(size, (array.shape[axis], name))
                    if array.shape[axis] != seen:
                        raise ValueError(
                            f"input '{name}' axis {axis} ({size}) is {array.shape[axis]}, but '{other}' has {seen}"
                        )
            feeds[name] = array
        unknown = set(arrays) - set(feeds)
        if unknown:
            raise ValueError(f"unknown input '{sorted(unknown)[0]}'")
        if self.spec["batch_dynamic"]:
            rows = {a.shape[0] for a in feeds.values()}
            if len(rows) != 1:
                raise ValueError("all inputs of a request must have the same first-axis (batch) size")
        return feeds

    # --- batching -------------------------------------------------------------------------------------------

    def _groups(self, parsed):
        """Request indexes that can share one session call: same non-batch shapes (e.g. sequence length)."""
        if not self.spec["batch_dynamic"]:
            return [[i] for i in parsed]
        groups = {}
        for i, (feeds, _) in parsed.items():
            key = tuple((name, array.shape[1:]) for name, array in sorted(feeds.items()))
            groups.setdefault(key, []).append(i)
        return list(groups.values())

    def _run(self, requests):
        names = self.spec["outputs"]
        if len(requests) == 1:
            return [dict(zip(names, self.session.run(names, requests[0])))]
        rows = [next(iter(feeds.values())).shape[0] for feeds in requests]
        joined = {name: np.concatenate([feeds[name] for feeds in requests]) for name in requests[0]}
        results = self.session.run(names, joined)
        bounds = np.cumsum(rows)[:-1]
        split = [np.split(result, bounds) for result in results]
        return [dict(zip(names, parts)) for parts in zip(*split)]
