"""The engine's view of an MLflow model registry: resolve a models:/ URI to one immutable model version.

Resolution runs on every `kiln plan`/`kiln run` (an alias may have moved); downloading is the fetch stage's job.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.errors import SourceError, first_line
from pipeline.recipe import parse_model_uri


class Unreachable(SourceError):
    """The registry itself did not answer (as opposed to a model, version or alias it does not have)."""


@dataclass(frozen=True)
class SourceRef:
    uri: str  # as written in the recipe
    tracking_uri: str
    name: str
    version: str
    run_id: str | None
    model_source: str  # where MLflow says the version's files are
    created: int  # creation timestamp: with run_id, tells re-registered versions apart

    def identity(self) -> dict:
        """What a cache key may depend on: the version's identity, not where the registry happens to live."""
        data = asdict(self)
        data.pop("tracking_uri")
        data.pop("uri")
        return data


def sqlite_file(tracking_uri: str) -> Path | None:
    """The database file of a sqlite:/// tracking URI (relative to the working folder, as SQLAlchemy reads it);
    None for other URIs and in-memory databases."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    name = tracking_uri.removeprefix("sqlite:///").split("?", 1)[0]
    return None if name in ("", ":memory:") else Path(name)


def client(tracking_uri: str):
    """A client for an existing registry. MLflow would create a missing sqlite database (and its tables) on first
    use, so a mistyped path would look like an empty registry ("no alias"); kiln never creates one: registering
    models (`make demo`, examples.register) does."""
    import mlflow

    database = sqlite_file(tracking_uri)
    if database is not None and not database.is_file():
        where = "no such folder" if not database.parent.is_dir() else "no such file"
        raise SourceError(f"tracking URI {tracking_uri}: {where}: {database} (kiln does not create registries; "
                          "check the path, or register models there first)")
    return mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _unreachable(exc: Exception) -> bool:
    text = f"{type(exc).__name__} {exc}"
    return any(
        marker in text
        for marker in ("ConnectionError", "Max retries", "Connection refused", "Failed to establish", "timed out")
    )


def resolve(uri: str, tracking_uri: str) -> SourceRef:
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_model_uri(uri)
    registry = client(tracking_uri)
    try:
        if alias is not None:
            found = registry.get_model_version_by_alias(name, alias)
        elif version == "latest":
            versions = registry.search_model_versions(f"name = '{name}'", order_by=["version_number DESC"],
                                                      max_results=1)
            if not versions:
                raise SourceError(f"source.uri {uri}: registered model '{name}' has no versions at {tracking_uri}")
            found = versions[0]
        else:
            found = registry.get_model_version(name, version)
    except MlflowException as exc:
        if _unreachable(exc):
            raise Unreachable(f"tracking URI {tracking_uri}: unreachable ({first_line(exc, 200, empty=type(exc).__name__)})") from None
        if alias is not None:
            raise SourceError(
                f"source.uri {uri}: no alias '{alias}' on registered model '{name}' at {tracking_uri}"
            ) from None
        raise SourceError(f"source.uri {uri}: version {version} of '{name}' does not exist at {tracking_uri}") from None
    except SourceError:
        raise  # ours (no versions): its own reason, not "unreachable" because the URI says sqlite
    except Exception as exc:  # requests / sqlalchemy errors before MLflow wraps them
        if _unreachable(exc) or "sqlite" in str(exc).lower():
            raise Unreachable(f"tracking URI {tracking_uri}: unreachable ({first_line(exc, 200, empty=type(exc).__name__)})") from None
        raise
    return SourceRef(
        uri=uri,
        tracking_uri=tracking_uri,
        name=name,
        version=str(found.version),
        run_id=found.run_id,
        model_source=found.source,
        created=int(found.creation_timestamp or 0),
    )
