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
