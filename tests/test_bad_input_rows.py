"""Issue 18, rows 5-8 and 11-13: validation data is checked, not coerced; every bad input exits 2 with one line
that names the field, file, tensor or path; serving values cannot break out of their config line; paths stay
inside; the crash log follows --artifacts; a broken pipe is quiet; a mistyped sqlite path creates nothing.

Most cases run the real command line in this process (conftest.cli_invoke, inline executor, one artifacts folder
so the fetched model is reused); the ones about the process itself (crash log, broken pipe) are subprocesses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, base_env, cli_invoke, error_lines, kiln

MODEL = "models:/digits-onnx-inline@champion"  # pixels float32 [N, 64] -> scores [N, 10]


def recipe(folder: Path, name: str, data: str = "{source: synthetic, samples: 8}", extra: str = "") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(f"name: {name}\nsource: {{uri: '{MODEL}'}}\nvalidation: {{data: {data}}}\n{extra}")
    return path


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rows-artifacts")


def run_bad(registry: str, artifacts: Path, recipe_path: Path) -> str:
    """`kiln run` in this process must exit 2 with exactly one error line, no traceback; returns that line."""
    code, out, err = cli_invoke("run", str(recipe_path), "--tracking-uri", registry, "--artifacts", str(artifacts),
                                "--executor", "inline")
    assert code == 2 and "Traceback" not in out + err, (code, err)
    lines = error_lines(err)
    assert len(lines) == 1, err
    return lines[0]


def validate_bad(recipe_path: Path) -> str:
    code, out, err = cli_invoke("validate", str(recipe_path))
    assert code == 2 and "Traceback" not in out + err, (code, err)
    return err


def npz_recipe(folder: Path, name: str, **arrays) -> Path:
    """A recipe reading `arrays` from <name>.npz (an array named `labels` is declared as the labels)."""
    np.savez(folder / f"{name}.npz", **arrays)
    return recipe(folder, name, f"{{source: npz, path: {name}.npz{', labels: labels' if 'labels' in arrays else ''}}}")


PIXELS = np.random.default_rng(0).random((8, 64)).astype(np.float32)


# --- row 5: dtypes the model does not take are refused, never cast -----------------------------------------------

@pytest.mark.parametrize("dtype, says", [
    (np.complex64, "is complex64, the model takes float32; complex data is never cast"),
    (np.int64, "is int64, the model takes float32; save the data as float32"),
    (np.bool_, "is bool, the model takes float32"),
    ("<U3", "string data is never cast"),
])
def test_row5_wrong_dtype_is_refused(onnx_registry_session, artifacts, tmp_path, dtype, says):
    line = run_bad(onnx_registry_session, artifacts, npz_recipe(tmp_path, "dtype", pixels=PIXELS.astype(dtype)))
    assert "tensor 'pixels'" in line and says in line and "dtype.npz" in line


def test_row5_object_array_is_refused(onnx_registry_session, artifacts, tmp_path):
    np.savez(tmp_path / "obj.npz", pixels=np.array([object()] * 8, dtype=object))
    line = run_bad(onnx_registry_session, artifacts, recipe(tmp_path, "obj", "{source: npz, path: obj.npz}"))
    assert "holds Python objects (pickled)" in line


def test_row5_safe_casts_and_what_they_note():
    from pipeline.errors import DataError
    from stages.tensors import ModelSpec, TensorSpec, conform

    f32 = ModelSpec([TensorSpec("x", "float32", ["batch", 4])], None)
    out, notes = conform(f32, {"x": np.ones((2, 4), np.float64)}, "o")
    assert out["x"].dtype == np.float32 and notes == ["tensor 'x': float64 data cast to the model's float32"]
    f64 = ModelSpec([TensorSpec("x", "float64", ["batch", 4])], None)  # scikit-learn signatures say float64
    data = np.ones((2, 4), np.float64)
    out, notes = conform(f64, {"x": data}, "o")
    assert out["x"] is data and notes == []
    i64 = ModelSpec([TensorSpec("ids", "int64", ["batch", 4])], None)
    assert conform(i64, {"ids": np.ones((2, 4), np.int32)}, "o")[0]["ids"].dtype == np.int64
    i32 = ModelSpec([TensorSpec("ids", "int32", ["batch", 4])], None)
    with pytest.raises(DataError, match=r"values \(0..4294967296\) do not fit"):
        conform(i32, {"ids": np.array([[0, 1, 2, 2**32]] * 2)}, "o")
    with pytest.raises(DataError, match=r"sample 1 holds inf"):  # 1e300 does not fit float32
        conform(f32, {"x": np.array([[0.0] * 4, [1e300] * 4])}, "o")


# --- row 6: each of these was a traceback and exit 3 -------------------------------------------------------------

def test_row6_truncated_npz(onnx_registry_session, artifacts, tmp_path):
    np.savez(tmp_path / "cut.npz", pixels=PIXELS)
    whole = (tmp_path / "cut.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(whole[: len(whole) // 2])
    line = run_bad(onnx_registry_session, artifacts, recipe(tmp_path, "cut", "{source: npz, path: cut.npz}"))
    assert "cut.npz: truncated or corrupt .npz file" in line


def test_row6_zero_samples(onnx_registry_session, artifacts, tmp_path):
    line = run_bad(onnx_registry_session, artifacts, npz_recipe(tmp_path, "zero", pixels=np.zeros((0, 64), np.float32)))
    assert "tensor 'pixels' is empty (shape [0, 64])" in line


def test_row6_labels_shorter_than_samples(onnx_registry_session, artifacts, tmp_path):
    path = npz_recipe(tmp_path, "short", pixels=PIXELS, labels=np.arange(4))
    assert "validation.data.labels 'labels': 4 labels for 8 samples" in run_bad(onnx_registry_session, artifacts, path)


@pytest.mark.parametrize("data, field", [
    ("{source: synthetic, seed: -1}", "validation.data.seed: Input should be greater than or equal to 0"),
    ("{source: synthetic, axes: {seq: -5}}", "validation.data.axes.seq: Input should be greater than or equal to 1"),
    ("{source: synthetic, samples: 1.0e+12}", "validation.data.samples: Input should be less than or equal to 100000"),
    ("{source: synthetic, samples: 1e12}", "validation.data.samples: Input should be a valid integer"),  # YAML: a string
])
def test_row6_numbers_out_of_bounds(onnx_registry_session, artifacts, tmp_path, data, field):
    path = recipe(tmp_path, "bounds", data)
    assert field in validate_bad(path)
    assert field in run_bad(onnx_registry_session, artifacts, path)


def test_row6_synthetic_draw_too_big_for_memory(onnx_registry_session, artifacts, tmp_path):
    path = recipe(tmp_path, "huge", "{source: synthetic, samples: 100000, axes: {seq: 100000}}",
                  "inputs: [{name: pixels, dtype: float32, shape: [batch, seq]}]\n")
    assert "need 74.5 GiB; lower validation.data.samples" in run_bad(onnx_registry_session, artifacts, path)


def test_row6_non_utf8_recipe(onnx_registry_session, artifacts, tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(f"name: caf\xe9\nsource: {{uri: '{MODEL}'}}\n".encode("latin-1"))
    assert "not UTF-8 text (byte 0xe9 at offset 9)" in validate_bad(path)
    assert "not UTF-8 text" in run_bad(onnx_registry_session, artifacts, path)


def test_row6_publish_dest_is_a_file(onnx_registry_session, artifacts, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    path = recipe(tmp_path, "destfile", extra=f"publish: {{dest: '{tmp_path / 'a-file'}'}}\n")
    assert f"publish.dest: {tmp_path / 'a-file'} is a file, not a folder" in run_bad(onnx_registry_session, artifacts, path)


# --- row 7: NaN in the data is the data's fault, not a failed gate ------------------------------------------------

def test_row7_nan_input_names_tensor_and_sample(onnx_registry_session, artifacts, tmp_path):
    pixels = PIXELS.copy()
    pixels[3, 5] = np.nan
    pixels[6, 0] = np.inf
    line = run_bad(onnx_registry_session, artifacts, npz_recipe(tmp_path, "nan", pixels=pixels))
    assert "tensor 'pixels' sample 3 holds nan (2 non-finite value(s) in all)" in line and "gate" not in line


# --- row 8: serving values are validated and stay on their line ---------------------------------------------------

@pytest.mark.parametrize("serving, field", [
    ("{torchserve: {address: \"127.0.0.1\\ncors_allowed_origin=*\"}}", "serving.torchserve.address: "),
    ("{torchserve: {inference_port: -1}}", "serving.torchserve.inference_port: Input should be greater than or equal to 1"),
    ("{torchserve: {management_port: 99999}}", "serving.torchserve.management_port: Input should be less than or equal to 65535"),
    ("{torchserve: {metrics_port: 8080}}", "serving.torchserve: inference_port, management_port and metrics_port must differ"),
    ("{tf_serving: {version_labels: {\"a b\": latest}}}", "serving.tf_serving.version_labels.a b.[key]"),
    ("{tf_serving: {version_labels: {stable: \"1\\n2\"}}}", "serving.tf_serving.version_labels.stable"),
])
def test_row8_serving_fields(tmp_path, serving, field):
    err = validate_bad(recipe(tmp_path, "serving", extra=f"serving: {serving}\n"))
    assert field in err, err


def test_row8_config_lines_cannot_break():
    from pipeline.errors import ModelError
    from pipeline.recipe import Recipe
    from stages.targets import one_line, url_host
    from stages.targets.torchserve import Config

    assert Config(address="::1").address == "::1" and url_host("::1") == "[::1]"
    assert Config(address="serving-01.example.com").address == "serving-01.example.com"
    with pytest.raises(ModelError, match="control character"):
        one_line("/bundles/x\nallowed_urls=.*", "publish.dest")
    for uri in ("models:/x\ncors_allowed_origin=*@champion", "models:/x@champion\n"):
        with pytest.raises(ValueError, match="is not models:/NAME@ALIAS"):
            Recipe.model_validate({"name": "r", "source": {"uri": uri}})
    with pytest.raises(ValueError, match="publish.dest"):
        Recipe.model_validate({"name": "r", "source": {"uri": MODEL}, "publish": {"dest": "/tmp/a\nb"}})


# --- row 11: paths stay inside -----------------------------------------------------------------------------------

def test_row11_run_artifact_path_cannot_climb(onnx_registry_session, artifacts, tmp_path):
    path = recipe(tmp_path, "climb", "{source: run_artifact, path: ../../etc/hostname}")
    assert "validation.data.path: '../../etc/hostname' must be a relative path inside the run's artifacts" in validate_bad(path)
    assert "must be a relative path inside" in run_bad(onnx_registry_session, artifacts, path)


def test_row11_run_artifact_link_out_of_the_run_is_refused(onnx_registry_session, artifacts, tmp_path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=onnx_registry_session)
    run_id = client.get_model_version_by_alias("digits-onnx", "champion").run_id
    root = Path(client.get_run(run_id).info.artifact_uri.removeprefix("file://"))
    np.savez(tmp_path / "outside.npz", pixels=PIXELS)
    link = root / "validation" / "outside.npz"
    link.unlink(missing_ok=True)
    link.symlink_to(tmp_path / "outside.npz")
    path = recipe(tmp_path, "link", "{source: run_artifact, path: validation/outside.npz}").read_text()
    (tmp_path / "link.yaml").write_text(path.replace("digits-onnx-inline", "digits-onnx"))
    line = run_bad(onnx_registry_session, artifacts, tmp_path / "link.yaml")
    assert f"validation.data.path: 'validation/outside.npz' leads out of the artifacts of run {run_id}" in line


def test_row11_relative_publish_dest_cannot_leave_the_artifacts(onnx_registry_session, artifacts, tmp_path):
    path = recipe(tmp_path, "escape", extra="publish: {dest: ../../..}\n")
    line = run_bad(onnx_registry_session, artifacts, path)
    assert "publish.dest: '../../..' resolves to" in line and "write an absolute path to publish there" in line
    absolute = recipe(tmp_path, "absolute", extra=f"publish: {{dest: '{tmp_path / 'out'}'}}\n")
    code, out, err = cli_invoke("plan", str(absolute), "--tracking-uri", onnx_registry_session,
                                "--artifacts", str(artifacts))
    assert code == 0 and f"-> {tmp_path / 'out' / 'absolute' / 'v1'}" in out, err


# --- row 12: the crash log follows --artifacts; a broken pipe is quiet ---------------------------------------------

def test_row12_crash_log_goes_to_the_artifacts_given(onnx_registry_session, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "store").write_text("a file where the store folder should be")  # a real crash: exit 3
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    result = kiln("run", str(recipe(tmp_path, "crash")), "--tracking-uri", onnx_registry_session,
                  "--artifacts", str(elsewhere), cwd=cwd)
    assert result.returncode == 3, result.stderr
    assert f"(traceback: {elsewhere / 'logs' / 'kiln-crash.log'})" in error_lines(result.stderr)[0]
    assert "NotADirectoryError" in (elsewhere / "logs" / "kiln-crash.log").read_text()
    assert not (cwd / "artifacts").exists()


def test_row12_broken_pipe_is_quiet(onnx_registry_session, tmp_path):
    for args in (["schema"], ["plan", str(recipe(tmp_path, "pipe")), "--tracking-uri", onnx_registry_session,
                              "--artifacts", str(tmp_path / "a")]):
        process = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=base_env(),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        process.stdout.close()  # the reader is gone before kiln writes (`| head -1` that already exited)
        err = process.stderr.read()
        assert process.wait(timeout=120) == 141 and err == "", (args, err)


# --- row 13: what a file is, and a registry that is not there -------------------------------------------------------

def test_row13_text_file_as_npz(onnx_registry_session, artifacts, tmp_path):
    (tmp_path / "notes.npz").write_text("pixels,label\n0.1,3\n")
    line = run_bad(onnx_registry_session, artifacts, recipe(tmp_path, "text", "{source: npz, path: notes.npz}"))
    assert "notes.npz: not an .npz file (no zip archive; it starts with b'pixels')" in line


@pytest.mark.parametrize("where, says", [("nonexistent/dir/x.db", "no such folder"), ("x.db", "no such file")])
def test_row13_mistyped_sqlite_path_creates_nothing(tmp_path, artifacts, where, says):
    database = tmp_path / where
    uri = f"sqlite:///{database}"
    line = run_bad(uri, artifacts, recipe(tmp_path, "registry"))
    assert f"tracking URI {uri}: {says}: {database}" in line
    assert not database.exists()


def test_row6_npz_that_would_not_fit_in_memory_is_refused_before_reading(tmp_path):
    """A zip's directory says how big each array is uncompressed: over 1 GiB is refused before anything is read
    (a small compressed file can hold many GiB of zeros)."""
    import struct

    from pipeline.errors import DataError
    from stages.tensors import read_npz

    np.savez(tmp_path / "big.npz", pixels=PIXELS)
    data = bytearray((tmp_path / "big.npz").read_bytes())
    entry = data.index(b"PK\x01\x02")  # the central directory entry: uncompressed size at offset 24
    data[entry + 24: entry + 28] = struct.pack("<I", 3 << 30)
    (tmp_path / "big.npz").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"big.npz: the arrays take 3.0 GiB uncompressed; kiln validates on at most 1 GiB"):
        read_npz(tmp_path / "big.npz", str(tmp_path / "big.npz"))


def test_a_failed_step_shared_by_two_recipes_fails_both(onnx_registry_session, artifacts, tmp_path):
    """Two recipes whose data step has one key (same model, same bad file): the second finds the key already
    failed, and both recipes report the data's fault (this was a KeyError, exit 3, when the second step became
    ready after the first had failed)."""
    np.savez(tmp_path / "cut.npz", pixels=PIXELS)
    whole = (tmp_path / "cut.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(whole[: len(whole) // 2])
    paths = [str(recipe(tmp_path, name, "{source: npz, path: cut.npz}")) for name in ("cut-a", "cut-b")]
    code, out, err = cli_invoke("run", *paths, "--tracking-uri", onnx_registry_session, "--artifacts", str(artifacts),
                                "--executor", "inline", "--json")
    assert code == 2 and "Traceback" not in out + err, (code, err)
    import json

    summary = json.loads(out)
    assert [r["status"] for r in summary["recipes"]] == ["bad_input", "bad_input"]
    assert all("cut.npz: truncated or corrupt .npz file" in r["reason"] for r in summary["recipes"])
