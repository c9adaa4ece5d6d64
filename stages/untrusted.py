"""Which files of a downloaded MLflow model would run code when loaded, and the refusal when nobody trusts them.

Loading a pickle runs whatever the pickle says: PyTorch's `serialization_format="pickle"` (data/model.pth),
cloudpickle/pickle scikit-learn models, `pytorch_model.bin` weights, joblib files. MLflow's `code_paths` are
imported at load time. kiln loads those only when the recipe (`source.allow_pickle: true`) or the kiln-wide trust
file allows it for the model or its registry (pipeline/trust.py); everything else is refused by fetch and again by
every step that loads the original (a cached fetch does not make a model trusted).

Detection is by format, never by trusting a name alone: the MLmodel (flavors' `code`, scikit-learn's
`serialization_format` and skops trusted types), pickle opcodes at the start of a file, zip archives holding
pickles (torch.save's `data.pkl`), the usual pickle suffixes, and PyTorch pt2 archives whose members torch.export
would unpickle without `weights_only` (pickled weights or constants, custom objects, sample inputs that are not
plain tensors).
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import yaml

from pipeline.errors import ModelError

PICKLE_SUFFIXES = {".pkl", ".pickle", ".joblib", ".cloudpickle", ".pth", ".pt", ".ckpt"}
PT2_RAW = ("weight_", "tensor_")  # torch.export's raw tensor files in a pt2 archive
SAFE_ALTERNATIVES = ("PyTorch pt2 (MLflow's default), ONNX, TensorFlow SavedModel/Keras, scikit-learn skops, "
                     "safetensors")
# skops builds only the types it is told to trust; types from the MLmodel outside these packages are not data.
SKOPS_SAFE_PREFIXES = ("sklearn.", "numpy.", "scipy.")


def _starts_like_pickle(head: bytes) -> bool:
    """Protocol 2-5 pickles start with PROTO (0x80) and the protocol number."""
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _zip_pickles(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as archive:
            return [n for n in archive.namelist() if n.endswith(".pkl") or n.endswith("/data.pkl")]
    except (zipfile.BadZipFile, OSError):
        return []


def _pt2_problems(path: Path) -> list[str]:
    """Members of a torch.export archive that torch.export.load would unpickle with weights_only=False."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        return [f"{path.name} (not a readable pt2 archive)"]
    found = []
    with archive:
        for name in archive.namelist():
            if name.endswith(("_weights_config.json", "_constants_config.json")):
                try:
                    config = json.loads(archive.read(name)).get("config", {})
                except ValueError:
                    found.append(f"{name} (unreadable)")
                    continue
                # Raw tensor payloads are "weight_N" / "tensor_N"; custom and opaque objects are pickles.
                found += [f"{name}: {fqn} is pickled" for fqn, meta in config.items()
                          if meta.get("use_pickle") or not str(meta.get("path_name", "")).startswith(PT2_RAW)]
            elif "/sample_inputs/" in name:
                if not _plain_tensors(archive.read(name)):
                    found.append(f"{name} (sample inputs that are not plain tensors: torch would unpickle them)")
            elif name.endswith((".pt", ".pkl")):  # e.g. a legacy archive's pickled state dict
                found.append(f"{name} (pickled)")
    return found


def _plain_tensors(data: bytes) -> bool:
    """torch.export.load falls back to a full unpickle when weights_only fails; refuse what would need it."""
    if not data:
        return True
    import warnings

    import torch

    try:
        with warnings.catch_warnings():  # torch warns about protocols it did not write; the refusal says enough
            warnings.simplefilter("ignore")
            torch.load(io.BytesIO(data), weights_only=True)
    except Exception:  # noqa: BLE001 - anything the safe unpickler refuses is not plain tensors
        return False
    return True


def _mlmodel_problems(model_dir: Path) -> list[str]:
    try:
        mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []  # fetch reports a missing or broken MLmodel itself
    found = []
    for flavor, conf in (mlmodel.get("flavors") or {}).items():
        conf = conf if isinstance(conf, dict) else {}
        if conf.get("code") and not any(f.startswith(f"{conf['code']}/") for f in found):
            found.append(f"{conf['code']}/ (code_paths of flavor {flavor}: imported when the model loads)")
        if flavor == "sklearn":
            if conf.get("serialization_format", "cloudpickle") != "skops":
                found.append(f"{conf.get('pickled_model', 'model.pkl')} "
                             f"(sklearn serialization_format {conf.get('serialization_format', 'cloudpickle')})")
            found += [f"MLmodel (skops_trusted_types trusts {t})" for t in conf.get("skops_trusted_types") or []
                      if not str(t).startswith(SKOPS_SAFE_PREFIXES)]
    return found


def _file_problem(path: Path, rel: str) -> str | None:
    if path.suffix == ".pt2":
        problems = _pt2_problems(path)
        return f"{rel} ({'; '.join(problems[:2])})" if problems else None
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError:
        return None
    if _starts_like_pickle(head):
        return f"{rel} (a pickle)"
    inside = _zip_pickles(path) if head.startswith(b"PK") else []
    if inside:
        return f"{rel} (a zip holding {inside[0]}: torch.save's pickle format)"
    if path.suffix in PICKLE_SUFFIXES:
        return f"{rel} (a {path.suffix} file)"
    return None


def pickle_based(model_dir: Path) -> list[str]:
    """Every file of the model that loading would unpickle or import, each with why; [] when none."""
    found = _mlmodel_problems(model_dir)
    for path in sorted(model_dir.rglob("*")):
        rel = path.relative_to(model_dir).as_posix()
        if path.is_file() and not any(rel.startswith(p.split(" ", 1)[0]) for p in found):
            problem = _file_problem(path, rel)
            if problem:
                found.append(problem)
    return found


def require_trusted(model_dir: Path, uri: str, allow_pickle: bool) -> None:
    """Exit 2 naming the file when the model needs a pickle load (or code import) and nobody allowed it."""
    if allow_pickle:
        return
    found = pickle_based(model_dir)
    if found:
        more = f" and {len(found) - 1} more" if len(found) > 1 else ""
        raise ModelError(
            f"{uri}: {found[0]}{more} would run code from the registry when loaded; log the model in a safe format "
            f"({SAFE_ALTERNATIVES}), or trust it: source.allow_pickle: true in the recipe, or the model or its "
            f"registry under allow_pickle in <artifacts>/trust.yaml"
        )


def check_unchanged(record: Path, key: str, uri: str, files: dict[str, str]) -> bool:
    """Compare a version's files ({relative path: sha256}) with those recorded at its first fetch; record them when
    this is the first. True when newly recorded. Exit 2 naming the files when the version's content changed: a
    registered version is immutable, so a change means its artifacts were altered after registration.

    The record (JSON, one entry per version identity) survives runs and stores; read-merge-write happens under an
    exclusive lock on a side file, and the write is atomic, so concurrent fetches of other versions keep theirs."""
    import fcntl
    import time

    from pipeline.store import write_json_atomic

    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        lock = open(record.with_name(record.name + ".lock"), "w")
    except OSError:
        return False  # a worker that does not see the artifacts folder (Ray without a shared disk): no record there
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            known = json.loads(record.read_text())
        except (OSError, ValueError):
            known = {}
        first = known.get(key)
        if first is None:
            known[key] = {"uri": uri, "at": time.time(), "files": files}
            write_json_atomic(record, known)
            return True
    before = first.get("files", {})
    changed = sorted(p for p in set(before) | set(files) if before.get(p) != files.get(p))
    if changed:
        raise ModelError(
            f"{uri}: files changed since the version was first fetched ({', '.join(changed[:3])}"
            f"{', ...' if len(changed) > 3 else ''}); a registered version must not change: register the new "
            f"files as a new version (first fetch recorded in {record})"
        )
    return False
