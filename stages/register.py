"""register: write the published bundle back to the MLflow registry (recipe `publish.write_back`).

Logs the ONNX model with MLflow's onnx flavor (signature, input example) in a run of the write-back experiment,
with the parity/latency metrics and the reports, tags carrying the lineage; registers it as a new version of
the target model; moves the alias (and the legacy stage, if asked). Only reached when every gate passed.

Not a pure function: it changes the registry. It is made idempotent instead: a version whose
`kiln.bundle_sha256` tag is this bundle's is reused (the alias is moved to it if needed), so a re-run, or a run
after a registry outage interrupted the last step, completes without a second version. Artifacts are logged
before the version is created, so a version never points at missing files.
"""

from __future__ import annotations

import json
from pathlib import Path

from typing import Literal

import numpy as np
from pydantic import Field

from pipeline.errors import SourceError, first_line
from pipeline.hashing import sha256_file
from pipeline.schema import StageConfig, Strict
from stages import artifacts

VERSION = 2


class WriteBack(Strict):
    """Register the published ONNX model back in MLflow (onnx flavor) and move an alias when every gate passed."""

    enabled: bool = False
    model_name: str | None = Field(None, description="Target registered model; default: <source name>-onnx")
    alias: str | None = Field("optimized", description="Alias moved to the new version (only when gates pass)")
    stage: Literal["Staging", "Production", "Archived"] | None = Field(
        None, description="Legacy registry stage to transition to, for registries that still use stages"
    )
    experiment: str = Field("kiln-builds", description="Experiment of the write-back runs")
    tracking_uri: str | None = Field(None, description="Default: the source's tracking URI")


class Config(StageConfig):
    write_back: WriteBack  # without tracking_uri: where the registry lives is context, not key


INPUTS = {"bundle": artifacts.BUNDLE}
OUTPUT = artifacts.REGISTERED


def tools(config: Config, inputs: dict[str, Path]) -> list[str]:
    return ["mlflow", "onnx"]


def lineage_tags(manifest: dict, bundle_sha: str) -> dict[str, str]:
    source = manifest["source"]
    return {
        "kiln.recipe": manifest["recipe"]["name"],
        "kiln.recipe_sha256": manifest["recipe"]["sha256"],
        "kiln.source_uri": source["requested_uri"],
        "kiln.source_name": source["name"],
        "kiln.source_version": str(source["version"]),
        "kiln.source_run_id": str(source.get("run_id")),
        "kiln.bundle_sha256": bundle_sha,
        "kiln.gates": "passed" if manifest["gates"]["passed"] else "failed",
        "kiln.tools": json.dumps(manifest["tools"], sort_keys=True),
        "kiln.version": manifest["kiln_version"],
    }


def _metrics(manifest: dict) -> dict[str, float]:
    metrics = manifest["metrics"]
    values: dict[str, float] = {}
    for name, output in metrics["outputs"].items():
        for key in ("max_abs_error", "cosine"):
            if output.get(key) is not None:
                values[f"{key}.{name}"] = float(output[key])
    for batch, timing in metrics["latency"].items():
        values[f"p50_ms.original.b{batch}"] = timing["original"]["p50_ms"]
        values[f"p50_ms.onnxruntime.b{batch}"] = timing["onnxruntime"]["p50_ms"]
        values[f"speedup.b{batch}"] = timing["speedup_p50"]
    if metrics.get("task"):
        values["accuracy.original"] = metrics["task"]["reference"]
        values["accuracy.onnxruntime"] = metrics["task"]["candidate"]
    return values


def _existing(client, name: str, bundle_sha: str):
    try:
        found = client.search_model_versions(f"name = '{name}' and tag.`kiln.bundle_sha256` = '{bundle_sha}'")
    except Exception:  # noqa: BLE001 - a registry without tag search: fall back to scanning
        found = [v for v in client.search_model_versions(f"name = '{name}'") if v.tags.get("kiln.bundle_sha256") == bundle_sha]
    return found[0] if found else None


def run(config: Config, inputs: dict[str, Path], out: Path, context: dict) -> dict:
    import mlflow
    import mlflow.onnx
    import onnx
    from mlflow.exceptions import MlflowException
    from mlflow.models import infer_signature

    bundle = inputs["bundle"]
    manifest = artifacts.manifest(bundle)
    settings = config.write_back
    tracking_uri = context["tracking_uri"]
    target = settings.model_name or f"{manifest['source']['name']}-onnx"
    bundle_sha = sha256_file(artifacts.manifest_file(bundle))  # the manifest holds every file's sha256
    tags = lineage_tags(manifest, bundle_sha)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        version = _existing(client, target, bundle_sha) if _has_model(client, target) else None
        run_id = version.run_id if version else None
        if version is None:
            run_id, model_uri = _log(client, mlflow, tracking_uri, settings, manifest, bundle, tags, target,
                                     onnx, infer_signature)
            # register_model, not create_model_version: a tracking server wants the logged model's id with it.
            version = mlflow.register_model(model_uri, target, tags=tags)
        if settings.alias:
            client.set_registered_model_alias(target, settings.alias, version.version)
        if settings.stage:
            client.transition_model_version_stage(target, version.version, settings.stage)
    except MlflowException as exc:
        raise SourceError(
            f"publish.write_back: registry {tracking_uri} refused or unreachable ({first_line(exc, 200)}); "
            "no alias was moved; the next run completes the write-back"
        ) from None
    except OSError as exc:
        raise SourceError(f"publish.write_back: registry {tracking_uri} unreachable ({exc}); no alias was moved") from None
    record = {"model": target, "version": str(version.version), "alias": settings.alias, "run_id": run_id,
              "uri": f"models:/{target}/{version.version}", "bundle_sha256": bundle_sha}
    artifacts.write_registered(out, record)
    return record


def _has_model(client, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return True
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(getattr(exc, "error_code", "")) or "not found" in str(exc).lower():
            return False
        raise


def _log(client, mlflow, tracking_uri, settings, manifest, bundle, tags, target, onnx, infer_signature):
    """A write-back run holding the ONNX model (onnx flavor), metrics and reports; returns (run id, model URI)."""
    experiment = client.get_experiment_by_name(settings.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(settings.experiment)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    samples = {}
    if (bundle / "sample_inputs.npz").exists():
        with np.load(bundle / "sample_inputs.npz") as data:
            samples = {k: data[k] for k in data.files}
    outputs = {}
    if (bundle / "sample_outputs.npz").exists():
        with np.load(bundle / "sample_outputs.npz") as data:
            outputs = {k: data[k] for k in data.files}
    run_tags = {**tags, "kiln.status": "passed", "mlflow.runName": f"{manifest['recipe']['name']} v{manifest['source']['version']}"}
    with mlflow.start_run(experiment_id=experiment_id, tags=run_tags) as run:
        mlflow.log_metrics(_metrics(manifest))
        for name in ("report.md", "report.html", "manifest.json", "session_config.json"):
            if (bundle / name).exists():
                mlflow.log_artifact(str(bundle / name), artifact_path="kiln")
        info = mlflow.onnx.log_model(
            onnx.load(str(artifacts.onnx_model(bundle))),
            name="model",
            signature=infer_signature(samples, outputs) if samples and outputs else None,
            input_example=samples or None,
            pip_requirements=["onnxruntime"],
            # A model too large for one protobuf stays so in MLflow: its weights in a data file beside it.
            save_as_external_data=artifacts.data_file(artifacts.onnx_model(bundle)).exists(),
        )
    return run.info.run_id, info.model_uri


def plan(graph) -> None:
    """Keyed on the bundle (and the settings), so an unchanged build registers nothing new."""
    write_back = graph.recipe.publish.write_back
    if write_back.enabled:
        graph.add("register", {"write_back": write_back.model_dump(mode="json", exclude={"tracking_uri"})},
                  {"bundle": "publish"}, context={"tracking_uri": write_back.tracking_uri or graph.source.tracking_uri})
