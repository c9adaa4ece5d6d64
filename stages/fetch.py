"""fetch: download one model version from the MLflow registry, check it against what MLflow recorded, and
describe it (flavor, signature, input example) in source.json."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from pipeline.errors import ModelError, SourceError
from pipeline import progress
from pipeline.hashing import sha256_file, sha256_json
from pipeline.schema import StageConfig, Strict
from stages import artifacts, frameworks, untrusted

VERSION = 2


class Version(Strict):
    """One immutable model version (not where its registry lives: that is context, not key)."""

    name: str
    version: str
    run_id: str | None
    model_source: str
    created: int


class Config(StageConfig):
    source: Version


INPUTS: dict[str, str] = {}
OUTPUT = artifacts.SOURCE


def tools(config: Config, inputs: dict[str, Path]) -> list[str]:
    return ["mlflow"]


def _listing(artifact_uri: str, tracking_uri: str, prefix: str = "") -> dict[str, int | None]:
    """{relative path: size} of every file MLflow recorded under artifact_uri."""
    import mlflow.artifacts

    found: dict[str, int | None] = {}
    for info in mlflow.artifacts.list_artifacts(artifact_uri=artifact_uri, tracking_uri=tracking_uri) or []:
        rel = info.path.rsplit("/", 1)[-1] if "/" in info.path else info.path
        rel = f"{prefix}{rel}"
        if info.is_dir:
            found.update(_listing(f"{artifact_uri.rstrip('/')}/{rel.rsplit('/', 1)[-1]}", tracking_uri, f"{rel}/"))
        else:
            found[rel] = info.file_size
    return found


def _tensor_specs(schema_json: str | None) -> list[dict] | None:
    if not schema_json:
        return None
    specs = json.loads(schema_json)
    if not all(s.get("type") == "tensor" for s in specs):
        return None  # column-based signature: the recipe must declare tensors
    return [
        {"name": s.get("name"), "dtype": s["tensor-spec"]["dtype"], "shape": s["tensor-spec"]["shape"]} for s in specs
    ]


def _verified(download_uri: str, tracking_uri: str, local: Path, uri: str) -> tuple[dict, dict[str, int]]:
    """Check the download against MLflow's own record of the version's files: (recorded, {path: size} got)."""
    recorded = _listing(download_uri, tracking_uri)
    got = {p.relative_to(local).as_posix(): p.stat().st_size for p in local.rglob("*") if p.is_file()}
    missing = sorted(set(recorded) - set(got))
    wrong = sorted(r for r, size in recorded.items() if r in got and size is not None and got[r] != size)
    if missing or wrong:
        raise SourceError(
            f"{uri}: download does not match MLflow's record (missing: {missing[:3]}, size differs: {wrong[:3]})"
        )
    return recorded, got


def _check_trust(source: Version, local: Path, got: dict[str, int], context: dict) -> None:
    """A version never changes: its files' sha256 at the first fetch are recorded, later fetches must match.
    Then nothing that would run code when loaded (pickles, code_paths) passes unless the recipe or the kiln-wide
    trust file allows it for this model or registry (context, not key: trust is not content)."""
    uri = f"models:/{source.name}/{source.version}"
    if context.get("fetch_record"):
        hashes = {rel: sha256_file(local / rel) for rel in sorted(got)}
        untrusted.check_unchanged(Path(context["fetch_record"]), sha256_json(source.model_dump(mode="json")),
                                  uri, hashes)
    untrusted.require_trusted(local, uri, bool(context.get("allow_pickle")))


def run(config: Config, inputs: dict[str, Path], out: Path, context: dict) -> dict:
    import mlflow
    import mlflow.artifacts

    source = config.source
    tracking_uri = context["tracking_uri"]
    name, version = source.name, source.version
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    progress.update(f"downloading models:/{name}/{version}")
    try:
        download_uri = client.get_model_version_download_uri(name, version)
        downloaded = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=download_uri, dst_path=str(out.parent / "download"), tracking_uri=tracking_uri
            )
        )
    except Exception as exc:  # noqa: BLE001
        raise SourceError(f"models:/{name}/{version}: download failed: {type(exc).__name__}: {exc}") from None
    local = artifacts.model_dir(out)
    downloaded.rename(local)  # MLflow nests the files under the artifact folder's name

    recorded, got = _verified(download_uri, tracking_uri, local, f"models:/{name}/{version}")

    mlmodel_path = local / "MLmodel"
    if not mlmodel_path.is_file():
        raise ModelError(f"models:/{name}/{version}: no MLmodel file; is this an MLflow model?")
    mlmodel = yaml.safe_load(mlmodel_path.read_text())
    flavors = mlmodel.get("flavors", {})
    # The order of the source frameworks registry is the order of preference when a model has several flavors.
    flavor = next((f for f in frameworks.FRAMEWORKS if f in flavors), None)
    if flavor is None:
        raise ModelError(
            f"models:/{name}/{version}: flavors {sorted(flavors)} include none kiln can convert ({', '.join(frameworks.FRAMEWORKS)})"
        )
    # After the flavor: a model kiln cannot convert is refused for that, not for being untrusted. Nothing above
    # loads the model (the MLmodel is read with yaml.safe_load).
    _check_trust(source, local, got, context)
    signature = mlmodel.get("signature") or {}
    example = mlmodel.get("saved_input_example_info") or {}
    description = {
        "uri": f"models:/{name}/{version}",
        "name": name,
        "version": version,
        "run_id": source.run_id,
        "flavor": flavor,
        "flavors": sorted(flavors),
        "framework_version": flavors[flavor].get(f"{flavor}_version") or flavors[flavor].get("keras_version"),
        "mlflow_version": mlmodel.get("mlflow_version"),
        "signature": {"inputs": _tensor_specs(signature.get("inputs")), "outputs": _tensor_specs(signature.get("outputs"))},
        "input_example": example.get("artifact_path"),
        "files_checked": len(recorded),
    }
    artifacts.write_source(out, description)
    return {"flavor": flavor, "files": len(got), "bytes": sum(got.values())}


def plan(graph) -> None:
    source = graph.source
    graph.add("fetch", {"source": source.identity()}, context={"tracking_uri": source.tracking_uri})
