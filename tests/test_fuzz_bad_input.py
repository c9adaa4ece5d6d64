"""Issue 18: generated bad recipes and data files through `kiln validate` and `kiln run`. Every one must exit 2 with
exactly one `kiln:` error line and no traceback, never 3 (a crash) or 1 (a gate blamed for the data).

Seeded and reproducible (SEED). Four families: recipes the schema must refuse (random field mutations: huge, negative,
NaN, wrong types, control characters, unknown keys), recipe files that are not recipes (bytes, encodings, cut YAML,
nesting, aliases), data files that are not validation data (cut, random bytes, wrong dtypes, NaN/Inf, empty, wrong
shapes, bad labels, pickles, zips of other things) and path tricks (run artifacts, publish.dest, sqlite paths). The
cases run through the real command line in this process (conftest.cli_invoke, inline executor); a few of each
family also as real subprocesses."""

from __future__ import annotations

import copy
import io
import random
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import cli_invoke, error_lines, kiln

SEED = 18
MODEL = "models:/digits-onnx-inline@champion"  # pixels float32 [N, 64]
BASE = {
    "name": "fuzz",
    "source": {"uri": MODEL},
    "inputs": [{"name": "pixels", "dtype": "float32", "shape": ["batch", 64], "low": 0.0, "high": 1.0}],
    "validation": {"data": {"source": "synthetic", "samples": 8, "seed": 0, "axes": {"seq": 4}},
                   "latency": {"batch_sizes": [1, 8], "iterations": 100, "threads": 1, "time_budget_s": 1.0}},
    "gates": {"parity": {"default": {"atol": 1e-4, "rtol": 1e-3, "min_cosine": 0.9999}}},
    "variants": [{"name": "int8", "kind": "int8-dynamic"}],
    "serving": {"targets": ["triton", "torchserve"], "triton": {"max_batch_size": 8},
                "torchserve": {"address": "127.0.0.1", "inference_port": 8080, "management_port": 8081}},
    "publish": {"dest": None},
}
BAD_VALUES = [-1, -(2**40), 2**64, 10**30, 1.0e12, float("nan"), float("inf"), -float("inf"), 0.5, "x", "", None,
              [], {}, [[]], {"k": 1}, "a\nb", "\x00", "\x1b[31m", "../../..", "/etc/passwd", "é" * 50, "x" * 5000,
              "models:/x\n@y", "1e12", "${HOME}", True]


def leaves(tree, prefix=()):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from leaves(value, (*prefix, key))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from leaves(value, (*prefix, i))
    yield prefix


def set_at(tree, path, value):
    for part in path[:-1]:
        tree = tree[part]
    tree[path[-1]] = value


def schema_refuses(data) -> bool:
    from pydantic import ValidationError

    from pipeline.recipe import Recipe

    try:
        Recipe.model_validate(data)
    except (ValidationError, ValueError, TypeError):
        return True
    return False


def mutated_recipes(rng: random.Random, count: int) -> list[bytes]:
    """Recipes with 1-3 fields set to bad values or unknown keys added; only those the schema must refuse."""
    paths = [p for p in leaves(BASE) if p]
    out = []
    while len(out) < count:
        data = copy.deepcopy(BASE)
        for _ in range(rng.randint(1, 3)):
            path = rng.choice(paths)
            try:
                if rng.random() < 0.15 and isinstance(path[-1], str):
                    set_at(data, (*path[:-1], path[-1] + rng.choice(["_typo", "\n", "\x00", "\u202e"])), 1)
                else:
                    set_at(data, path, rng.choice(BAD_VALUES))
            except (KeyError, IndexError, TypeError):  # an earlier mutation replaced a parent
                continue
        if schema_refuses(data):
            out.append(yaml.safe_dump(data, allow_unicode=True).encode())
    return out


def broken_files(rng: random.Random) -> list[bytes]:
    """Recipe files that are no recipe at all."""
    valid = yaml.safe_dump(BASE).encode()
    cases = [b"", b"\xff\xfe\x00n\x00a", "name: café".encode("latin-1"), "name: x\n".encode("utf-16"), b"[1, 2]",
             b"just a string", b"name: [unclosed", b"a: &a [*a]", b"\t\tname: tab", b"name: x\x00\n",
             b"[" * 5000 + b"]" * 5000, b"{a: " * 300 + b"1" + b"}" * 300, b"- " * 2000 + b"x",
             b"name: x\nname: y\nsource: {uri: 'models:/m@a'}\n", b"!!python/object:os.system ['echo hi']"]
    cases += [bytes(rng.randrange(256) for _ in range(rng.randint(1, 300))) for _ in range(15)]
    while len(cases) < 50:  # valid YAML cut at a random byte: mostly bad YAML or a recipe missing its fields
        cut = valid[: rng.randint(1, len(valid) - 1)]
        if cut.strip() and b"source" not in cut:
            cases.append(cut)
    return cases


def npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def zip_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def bad_data(rng: random.Random, count: int) -> list[tuple[bytes, bool]]:
    """(npz file content, has labels) pairs that the data step must refuse."""
    good = lambda n=8: rng_np.random((n, 64)).astype(np.float32)  # noqa: E731
    rng_np = np.random.default_rng(SEED)
    kinds = ["cut", "random", "dtype", "nonfinite", "shape", "labels", "other"]
    dtypes = [np.complex64, np.complex128, np.int8, np.int16, np.int32, np.int64, np.uint8, np.bool_, "<U4", "S4",
              "datetime64[s]", "timedelta64[s]"]
    out: list[tuple[bytes, bool]] = []
    while len(out) < count:
        kind = rng.choice(kinds)
        if kind == "cut":
            whole = npz_bytes(pixels=good())
            out.append((whole[: rng.randint(0, len(whole) - 1)], False))
        elif kind == "random":
            out.append((bytes(rng.randrange(256) for _ in range(rng.randint(0, 4000))), False))
        elif kind == "dtype":
            out.append((npz_bytes(pixels=(good() * 10).astype(rng.choice(dtypes))), False))
        elif kind == "nonfinite":
            pixels = good()
            for _ in range(rng.randint(1, 20)):
                pixels[rng.randrange(8), rng.randrange(64)] = rng.choice([np.nan, np.inf, -np.inf])
            out.append((npz_bytes(pixels=pixels), False))
        elif kind == "shape":
            shape = rng.choice([(0, 64), (8,), (8, 8, 8), (8, 64, 1), (8, rng.choice([1, 63, 65, 640])), ()])
            out.append((npz_bytes(pixels=np.ones(shape, np.float32)), False))
        elif kind == "labels":
            labels = rng.choice([np.arange(rng.randint(0, 7)), np.array(["a"] * 8), np.linspace(0, 1, 8),
                                 np.zeros((8, 2), np.int64), np.full(8, np.nan), np.zeros(8, np.complex64)])
            out.append((npz_bytes(pixels=good(), labels=labels), True))
        else:
            out.append((rng.choice([
                npz_bytes(x=good()), npz_bytes(), zip_of({"pixels": b"raw bytes, not .npy"}), zip_of({}),
                zip_of({"pixels.npy": b"\x93NUMPY garbage"}), npz_bytes(pixels=np.array([object()] * 8)),
                npz_bytes(pixels=np.zeros(8, dtype=[("a", "f4"), ("b", "f4")])), b"pixels\n0.1,0.2\n",
                _npy(good()),
            ]), False))
    return out


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def path_tricks(folder: Path) -> list[str]:
    """Recipe data/publish sections whose paths must be refused (run only: they need a resolved source)."""
    (folder / "a-file").write_text("x")
    (folder / "a-dir").mkdir(exist_ok=True)
    run_paths = ["../../etc/hostname", "/etc/hostname", "validation/../../x.npz", "..", "a\\..\\..\\b",
                 "validation", "nope.npz", "validation/digits-test.npz\n"]
    dests = ["..", "../..", "../../..", "a/../../../..", f"{folder / 'a-file'}", f"{folder / 'a-file' / 'under'}",
             "x\ny", " ", "\x00"]
    cases = [f"validation: {{data: {{source: run_artifact, path: {_q(p)}}}}}" for p in run_paths]
    cases += [f"validation: {{data: {{source: npz, path: {_q(p)}}}}}" for p in ("nope.npz", "a-dir", "a-file/x.npz", "")]
    cases += [f"publish: {{dest: {_q(d)}}}" for d in dests]
    return cases


def _q(text: str) -> str:
    return yaml.safe_dump(text, default_style='"').strip().removesuffix("...").strip()


def check(code: int, out: str, err: str, what: str, seen: Counter, validate: Path | None = None) -> None:
    """Exit 2, no traceback, one `kiln:` error line (for `validate`, the recipe it checked: the other lines are its
    problems, one a line)."""
    seen[code] += 1
    assert "Traceback" not in out + err, f"{what}: traceback\n{err[-2000:]}"
    assert code == 2, f"{what}: exit {code}\n{err[-2000:]}"
    lines = [line for line in error_lines(err) if not validate or line.startswith("kiln: error:")]
    assert len(lines) == 1, f"{what}: {len(lines)} error lines\n{err[-2000:]}"
    if validate:  # every other line is one problem: `<recipe path>: <field>: <what>`
        assert all(line.startswith(f"{validate}: ") or line in lines
                   for line in err.splitlines() if line), f"{what}: a problem spans lines\n{err[-2000:]}"


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, list[Path]]:
    folder = tmp_path_factory.mktemp("fuzz")
    rng = random.Random(SEED)
    written: dict[str, list[Path]] = {"recipe": [], "data": [], "path": []}
    for i, text in enumerate(mutated_recipes(rng, 180) + broken_files(rng)):
        written["recipe"].append(folder / f"recipe-{i:03}.yaml")
        written["recipe"][-1].write_bytes(text)
    for i, (content, labels) in enumerate(bad_data(rng, 110)):
        (folder / f"data-{i:03}.npz").write_bytes(content)
        path = folder / f"data-{i:03}.yaml"
        path.write_text(f"name: fuzz\nsource: {{uri: '{MODEL}'}}\nvalidation: {{data: {{source: npz, "
                        f"path: data-{i:03}.npz{', labels: labels' if labels else ''}}}}}\n")
        written["data"].append(path)
    for i, section in enumerate(path_tricks(folder)):
        path = folder / f"path-{i:03}.yaml"
        path.write_text(f"name: fuzz\nsource: {{uri: 'models:/digits-onnx@champion'}}\n{section}\n")
        written["path"].append(path)
    return written


def test_fuzz_bad_input_in_process(cases, onnx_registry_session, tmp_path):
    registry, artifacts = onnx_registry_session, str(tmp_path / "artifacts")
    run = ("--tracking-uri", registry, "--artifacts", artifacts, "--executor", "inline")
    seen: Counter = Counter()
    for path in cases["recipe"]:
        check(*cli_invoke("validate", str(path)), f"validate {path.name}", seen, validate=path)
        check(*cli_invoke("run", str(path), *run), f"run {path.name}", seen)
    for path in cases["data"] + cases["path"]:
        check(*cli_invoke("run", str(path), *run), f"run {path.name}", seen)
    for where in ("nonexistent/dir/x.db", "x.db", "a-file"):  # mistyped registries: nothing is created
        (tmp_path / "a-file").write_text("x")
        check(*cli_invoke("run", str(cases["data"][0]), *run[2:], "--tracking-uri", f"sqlite:///{tmp_path / where}"),
              f"registry {where}", seen)
    files = sum(len(v) for v in cases.values())
    print(f"fuzz: {files} generated files ({', '.join(f'{k} {len(v)}' for k, v in cases.items())}), "
          f"{sum(seen.values())} invocations, exit codes {dict(seen)}")
    assert files >= 300 and set(seen) == {2}


def test_fuzz_bad_input_subprocesses(cases, onnx_registry_session, tmp_path):
    """A few of each family through the real `kiln` executable (own interpreter, local worker processes)."""
    rng = random.Random(SEED + 1)
    picked = [*rng.sample(cases["recipe"], 2), *rng.sample(cases["data"], 2), rng.choice(cases["path"])]
    seen: Counter = Counter()
    for path in picked:
        result = kiln("run", str(path), "--tracking-uri", onnx_registry_session, "--artifacts", str(tmp_path / "a"))
        check(result.returncode, result.stdout, result.stderr, f"subprocess run {path.name}", seen)
    assert seen == {2: len(picked)}
