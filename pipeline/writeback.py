"""The registry side of a build that did not pass: record the failure on a run in the write-back experiment
(reason, verdicts, lineage) so the registry shows what was tried; no version is registered and no alias moves.
(Passing builds are written back by the `register` stage, which is part of the cached DAG.)"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from pipeline.plan import RecipePlan
from pipeline.runner import RecipeOutcome
from pipeline.store import Store


def write_back_uri(plan: RecipePlan) -> str | None:
    settings = plan.recipe.publish.write_back
    if not settings.enabled:
        return None
    return settings.tracking_uri or plan.source.tracking_uri


def record_failure(plan: RecipePlan, outcome: RecipeOutcome, store: Store) -> str | None:
    """Log a FAILED run for a recipe whose gate failed; returns its run id (None when write-back is off)."""
    uri = write_back_uri(plan)
    if uri is None or outcome.status == "passed":
        return None
    if any(step.stage == "register" and step.status == "failed" for step in outcome.steps):
        return None  # the write-back registry itself failed; its error already says so
    import mlflow

    settings = plan.recipe.publish.write_back
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name(settings.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(settings.experiment)
    tags = {
        "kiln.recipe": plan.name,
        "kiln.source_uri": plan.source.uri,
        "kiln.source_name": plan.source.name,
        "kiln.source_version": plan.source.version,
        "kiln.source_run_id": str(plan.source.run_id),
        "kiln.status": outcome.status,
        "kiln.reason": (outcome.reason or "")[:5000],
        "mlflow.runName": f"{plan.name} v{plan.source.version} ({outcome.status.replace('_', ' ')})",
    }
    run = client.create_run(experiment_id, tags=tags)
    # The step whose verdict failed the recipe (the runner's one notion of a gate): its files say why.
    judged = next((s for s in outcome.steps if s.key and (s.summary.get("verdict") or {}).get("passed") is False), None)
    entry = store.lookup(judged.key) if judged else None
    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "outcome.json"
        summary.write_text(json.dumps({"status": outcome.status, "reason": outcome.reason}, indent=2))
        client.log_artifact(run.info.run_id, str(summary), artifact_path="kiln")
        if entry is not None:
            client.log_artifacts(run.info.run_id, str(entry.out), artifact_path=f"kiln/{judged.stage}")
    client.set_terminated(run.info.run_id, status="FAILED")
    return run.info.run_id
