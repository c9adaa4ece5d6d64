"""Installed versions of the tools a step uses; they are part of every step's cache key."""

from __future__ import annotations

import platform
from functools import lru_cache
from importlib import metadata


@lru_cache(maxsize=None)
def version_of(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def versions(distributions: list[str]) -> dict[str, str | None]:
    return {name: version_of(name) for name in sorted(set(distributions))}


def onnxruntime_distribution() -> str:
    """onnxruntime or onnxruntime-gpu, whichever is installed (both at once is an error, see doctor)."""
    return "onnxruntime-gpu" if version_of("onnxruntime-gpu") else "onnxruntime"


def environment() -> dict[str, str | None]:
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "modelkiln": version_of("modelkiln"),
    }


def check_onnxruntime_install() -> None:
    """onnxruntime and onnxruntime-gpu install into one folder; with both present, whichever was installed last
    silently wins and uninstalling either breaks the import. Refuse to build on such an environment."""
    from pipeline.errors import KilnError

    cpu, gpu = version_of("onnxruntime"), version_of("onnxruntime-gpu")
    if cpu and gpu:
        raise KilnError(
            f"both onnxruntime {cpu} and onnxruntime-gpu {gpu} are installed and overwrite each other; "
            "`pip uninstall -y onnxruntime onnxruntime-gpu`, then install one (extra `cpu` or `gpu`)"
        )
