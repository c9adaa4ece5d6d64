"""Put a finished bundle at its destination atomically: copy beside it under a hidden name, then rename.

A reader of the destination sees the old bundle or the new one, never a mix; a run killed mid-copy leaves only
a hidden .tmp folder that the next delivery removes.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from pipeline.store import _pid_alive


def _same_bundle(src: Path, dest: Path) -> bool:
    try:
        return (src / "manifest.json").read_bytes() == (dest / "manifest.json").read_bytes()
    except OSError:
        return False


def _clean_leftovers(dest: Path) -> None:
    for sibling in dest.parent.glob(f".{dest.name}.*"):
        parts = sibling.name.split(".")
        pid = int(parts[-2]) if len(parts) >= 4 and parts[-2].isdigit() else None
        if pid is None or not _pid_alive(pid):
            shutil.rmtree(sibling, ignore_errors=True)


def deliver(src: Path, dest: Path) -> bool:
    """Make dest a copy of src. Returns False when dest already holds exactly this bundle."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(dest)
    if _same_bundle(src, dest):
        return False
    tag = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp = dest.parent / f".{dest.name}.tmp.{tag}"
    shutil.copytree(src, tmp)
    if dest.exists():
        old = dest.parent / f".{dest.name}.old.{tag}"
        os.rename(dest, old)
        os.rename(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dest)
    return True
