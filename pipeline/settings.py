"""Where kiln keeps things, and which MLflow registry it talks to when nothing else says."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import BadInput

# No network here and none wanted: keep MLflow and Olive from phoning home, and keep an unreachable
# tracking server from holding a run in minutes of retries.
QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "OLIVE_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "true",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "HF_HUB_OFFLINE": "1",
    # Fewer third-party log lines at their source (what is still written goes to the step's log, see
    # pipeline/executor.py); TF_ENABLE_ONEDNN_OPTS is left alone: it changes TensorFlow's numbers, not its logs.
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "GRPC_VERBOSITY": "ERROR",
    "GLOG_minloglevel": "2",
    "TOKENIZERS_PARALLELISM": "false",
}


def quiet_environment() -> None:
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)


def verbose() -> bool:
    """`--verbose` (or KILN_VERBOSE=1): third-party output streams to the console instead of the steps' logs.
    An environment variable, so the worker processes a run starts see it too."""
    return os.environ.get("KILN_VERBOSE", "").lower() not in ("", "0", "false", "no")


def quiet_python_output() -> None:
    """Keep libraries' Python warnings and log records (MLflow's notices, alembic's migrations) off the console
    of this process. kiln's own lines do not go through `warnings` or `logging`; errors still show."""
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)


@dataclass(frozen=True)
class Settings:
    artifacts: Path
    tracking_uri_override: str | None = None  # --tracking-uri
    # Where steps run and where workers that share no disk find the store (see pipeline/remote_store.py).
    executor: str = "local"  # --executor: local | inline | ray[=ADDRESS]
    jobs: int = 1  # --jobs
    store_url: str | None = None  # --store-url / KILN_STORE_URL: an fsspec URL mirrored by every worker

    @classmethod
    def from_env(cls, artifacts: str | None = None, tracking_uri: str | None = None) -> "Settings":
        root = Path(artifacts or os.environ.get("KILN_ARTIFACTS") or "artifacts").resolve()
        if root.exists() and not root.is_dir():
            raise BadInput(f"--artifacts {root}: a file, not a folder")
        return cls(root, tracking_uri, store_url=os.environ.get("KILN_STORE_URL") or None)

    @property
    def store_root(self) -> Path:
        return self.artifacts / "store"

    @property
    def bundles(self) -> Path:
        return self.artifacts / "bundles"

    @property
    def failed(self) -> Path:
        """Reports of builds that did not pass (nothing is published for them): failed/<recipe>/v<version>/."""
        return self.artifacts / "failed"

    @property
    def logs(self) -> Path:
        return self.artifacts / "logs"

    @property
    def default_tracking_uri(self) -> str:
        return f"sqlite:///{self.artifacts / 'mlflow.db'}"

    @property
    def default_artifact_location(self) -> str:
        return (self.artifacts / "mlruns").as_uri()

    def tracking_uri(self, recipe_uri: str | None) -> str:
        """--tracking-uri, then the recipe's source.tracking_uri, then MLFLOW_TRACKING_URI, then the local default."""
        return (
            self.tracking_uri_override
            or recipe_uri
            or os.environ.get("MLFLOW_TRACKING_URI")
            or self.default_tracking_uri
        )
