"""Content hashes: canonical JSON for configs, sha256 for files and directory trees."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def sha256_json(value: Any) -> str:
    return sha256_text(canonical_json(value))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def tree_files(root: Path) -> dict[str, Path]:
    """Regular files under root, keyed by their POSIX path relative to root, sorted."""
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def file_table(root: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {sha256, bytes}} for every file under root."""
    return {rel: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for rel, p in tree_files(root).items()}


def tree_hash(table: dict[str, dict[str, Any]]) -> str:
    """One hash for a file table: changes when any path or content changes."""
    return sha256_json({rel: entry["sha256"] for rel, entry in table.items()})
