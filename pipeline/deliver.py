"""Put a finished bundle at its destination: verified, immutable, race-free across processes.

A published bundle folder never changes. `deliver` copies the bundle beside its destination under a hidden
name and re-hashes the copy against the manifest's file table (a bundle damaged in the store or in the copy is
never published); then, holding an fcntl lock on the recipe's bundles folder, it renames the copy into place
only if the destination does not exist yet. A rename onto a missing name happens whole or not at all (the
former rename-old-then-rename-new exchange failed half-way, ENOTEMPTY, when two processes raced). A reader
sees no bundle or the whole one; a run killed mid-copy leaves a hidden .tmp folder the next delivery removes.

Which folder a build goes to (`version_folder`): `v<source version>` for the first recipe to publish that version;
a build of another recipe (its digest, manifest `recipe.sha256`, differs) gets `v<version>-<digest[:12]>`. The
folder is chosen when the recipe is planned, because serving configs hold the bundle's absolute path; a build
that finds its folder taken by another recipe at delivery (both planned before either published) is planned
again by the runner (BundleTaken).

A failed build's report is not immutable: the newest failure of a recipe and version replaces the older one
(`replace_folder`), by the same hidden-temp-then-rename, with the old folder renamed aside first.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import uuid
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Callable

from pipeline.errors import KilnError
from pipeline.hashing import sha256_file
from pipeline.store import _pid_alive

LOCK = ".deliver.lock"


class BundleTaken(KilnError):
    """The destination holds a bundle of another recipe; published bundles are never replaced."""


def recipe_of(bundle: Path) -> str | None:
    """The recipe digest a published bundle was built from (None: no bundle there)."""
    try:
        return json.loads((bundle / "manifest.json").read_text())["recipe"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def version_folder(root: Path, version: str, recipe_sha: str) -> Path:
    """Where a build of the recipe with digest recipe_sha for source `version` goes, under the recipe's folder."""
    plain = root / f"v{version}"
    if not plain.exists() or recipe_of(plain) == recipe_sha:
        return plain
    return root / f"v{version}-{recipe_sha[:12]}"


@contextmanager
def _locked(folder: Path):
    """Exclusive across processes (fcntl; released when the process dies, so a killed run holds nothing)."""
    with open(folder / LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _clean_leftovers(dest: Path) -> None:
    for sibling in dest.parent.glob(f".{dest.name}.*"):
        parts = sibling.name.split(".")
        pid = int(parts[-2]) if len(parts) >= 4 and parts[-2].isdigit() else None
        if pid is None or not _pid_alive(pid):
            shutil.rmtree(sibling, ignore_errors=True)


def _check_files(bundle: Path, shown: Path) -> bytes:
    """The manifest's bytes, once every file it lists has its recorded sha256 (KilnError naming the first that
    does not); `shown` is where the bundle comes from, for the message."""
    try:
        manifest = (bundle / "manifest.json").read_bytes()
        files = json.loads(manifest)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise KilnError(f"{shown}: not a bundle (manifest.json missing or without a file table)") from None
    for rel, info in files.items():
        try:
            same = sha256_file(bundle / rel) == info["sha256"]
        except OSError:
            same = False
        if not same:
            raise KilnError(f"{shown}/{rel}: does not match the sha256 in its manifest; nothing was published "
                            "(`kiln verify-store`, then run again to rebuild it)")
    return manifest


def _existing(src_manifest: bytes, dest: Path) -> str | None:
    """What dest already holds, against the bundle about to be delivered: None (nothing), "identical", "kept"."""
    try:
        there = (dest / "manifest.json").read_bytes()
    except FileNotFoundError:
        if dest.exists():  # a folder without a manifest is no bundle kiln made: leave it to the user
            raise BundleTaken(f"{dest}: exists and is not a bundle; move it away") from None
        return None
    if there == src_manifest:
        return "identical"
    ours = json.loads(src_manifest).get("recipe", {}).get("sha256")
    if ours is not None and recipe_of(dest) == ours:
        return "kept"  # the same recipe built again (e.g. re-measured after the store was cleaned): immutable
    raise BundleTaken(f"{dest}: already holds a bundle of another recipe (sha256 {recipe_of(dest)}); "
                      "published bundles are never replaced")


def deliver(src: Path, dest: Path) -> str:
    """Publish the bundle at src as dest. Returns "published", "identical" (dest already holds exactly this
    bundle) or "kept" (dest holds another build of the same recipe, left as it is); BundleTaken when dest holds
    another recipe's bundle."""
    try:
        manifest = (src / "manifest.json").read_bytes()
    except OSError:
        raise KilnError(f"{src}: not a bundle (no manifest.json)") from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(dest)
    with _locked(dest.parent):
        status = _existing(manifest, dest)
    if status is not None:  # decided without copying anything (a re-run of an unchanged build)
        return status
    tmp = dest.parent / f".{dest.name}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(src, tmp)
        manifest = _check_files(tmp, src)  # what is published is what the manifest says, byte for byte
        with _locked(dest.parent):
            status = _existing(manifest, dest)
            if status is None:
                os.rename(tmp, dest)  # dest is absent, and nobody else renames while we hold the lock
                return "published"
            return status
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_folder(dest: Path, fill: Callable[[Path], bool]) -> bool:
    """Write a folder with fill(tmp) beside dest, then put it at dest in place of what is there. A reader sees
    the old folder or the new one, each whole (or, between the two renames, none): never a half-written one.
    Returns False, leaving dest as it was, when fill returns False (it had nothing to write)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(dest)
    tag = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"  # the pid lets _clean_leftovers tell a live writer's folder
    tmp, aside = dest.parent / f".{dest.name}.tmp.{tag}", dest.parent / f".{dest.name}.old.{tag}"
    try:
        tmp.mkdir()
        if not fill(tmp):
            shutil.rmtree(tmp)
            with suppress(OSError):  # nothing to report: leave no empty folder (one in use is not empty)
                dest.parent.rmdir()
            return False
        with _locked(dest.parent):  # two failures of one recipe at once: one replaces the other, whole
            if dest.exists():
                os.rename(dest, aside)  # a folder cannot be renamed over a non-empty one
            os.rename(tmp, dest)
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(aside, ignore_errors=True)
