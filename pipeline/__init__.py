"""kiln's engine: recipe schema, plan, runner, content-addressed store, MLflow client, CLI.

Nothing in this package imports a machine-learning framework; framework knowledge lives in `stages`, reached only
through `pipeline.registry`.
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"


def open_store(root: Path, url: str | None = None):
    """The step store at root; with an fsspec URL, root is this process's cache of the shared store there.
    Both satisfy pipeline.store.StepStore. Here, not in store.py, so neither store module imports the other's."""
    from pipeline.store import Store

    if not url:
        return Store(root)
    from pipeline.remote_store import MirroredStore, RemoteStore

    return MirroredStore(Store(root), RemoteStore(url))
