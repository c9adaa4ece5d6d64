"""Content-addressed step store under <artifacts>/store.

A step's outputs live in steps/<key[:2]>/<key>/out with a meta.json beside them. Entries are built in tmp/ and
renamed into place in one step, so a reader sees a whole entry or none; a run killed at any moment leaves at most
a stale tmp/ folder, which the next run removes. The first complete write of a key wins; a concurrent writer of
the same key discards its copy and reuses the winner (the contents are the same by construction).

An entry is trusted only as far as it is verified: `lookup` checks every file against the sha256 recorded at
commit (meta.json `files`) and evicts an entry that does not match, so the step is built again. The check is
cached in verified.json beside meta.json: per file, the (size, mtime_ns, inode, ctime_ns) it had when its hash
last matched; an untouched file costs one stat, a file with any of them changed is hashed again. ctime cannot
be set back by hand (unlike mtime), so an edit that restores size and mtime is still seen.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pipeline.hashing import file_table, sha256_file, tree_hash

META = "meta.json"
VERIFIED = "verified.json"  # {relative path: stamp} of the files whose sha256 was last found right


@dataclass(frozen=True)
class Entry:
    key: str
    path: Path  # the entry folder; outputs are under path / "out"
    meta: dict[str, Any]

    @property
    def out(self) -> Path:
        return self.path / "out"

    @property
    def output_hash(self) -> str:
        return self.meta["output_hash"]


def write_json_atomic(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as handle:
        json.dump(value, handle, indent=2, sort_keys=True, default=str)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _stamp(path: Path) -> list[int]:
    """What changes when a file's content may have: an unchanged stamp means the last hash still holds."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def move_aside(path: Path) -> None:
    """Take an entry folder out of the store in one rename (readers then miss it), then delete it."""
    aside = path.with_name(f"{path.name}.damaged.{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:  # another process evicted it first
        return
    shutil.rmtree(aside, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StepStore(Protocol):
    """What the runner and the executors need of a step store; Store (a folder) and
    remote_store.MirroredStore (a local cache of a shared store at an fsspec URL) both are one."""

    root: Path
    evicted: dict[str, str]  # key -> the file whose sha256 did not match, for entries lookup evicted

    def lookup(self, key: str) -> Entry | None: ...

    def begin(self, key: str) -> Path: ...

    def commit(self, key: str, folder: Path, meta: dict[str, Any]) -> Entry: ...

    def abandon(self, folder: Path) -> None: ...

    def clean_stale(self) -> int: ...

    def verify(self) -> list[str]: ...


class Store:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.steps = self.root / "steps"
        self.tmp = self.root / "tmp"
        self.evicted: dict[str, str] = {}

    def entry_path(self, key: str) -> Path:
        return self.steps / key[:2] / key

    def _load(self, key: str) -> Entry | None:
        path = self.entry_path(key)
        try:
            return Entry(key, path, json.loads((path / META).read_text()))
        except (OSError, ValueError):
            return None

    def _read(self, key: str) -> Entry | None:
        """The entry for key if it is complete and its files still have their recorded sizes (not hashed)."""
        entry = self._load(key)
        if entry is None:
            return None
        for rel, info in entry.meta.get("files", {}).items():
            try:
                if (entry.out / rel).stat().st_size != info["bytes"]:
                    return None
            except OSError:
                return None
        return entry

    def lookup(self, key: str) -> Entry | None:
        """The entry for key if every file matches its recorded sha256; an entry with a file missing, of another
        size or with other content is evicted (recorded in self.evicted) and missed, so its step is built again."""
        entry = self._load(key)
        if entry is None:
            return None
        damaged = self._verify_files(entry)
        if damaged is None:
            return entry
        self.evicted[key] = damaged
        move_aside(entry.path)
        return None

    def _verify_files(self, entry: Entry) -> str | None:
        """None when every file of entry has its recorded sha256, else the first file that does not. One stat per
        file: only a file whose stamp changed since its hash last matched is hashed, and what was
        found right is recorded (atomically: concurrent runs share the file)."""
        try:
            known = json.loads((entry.path / VERIFIED).read_text())
        except (OSError, ValueError):
            known = {}
        fresh = {}
        for rel, info in entry.meta.get("files", {}).items():
            path = entry.out / rel
            try:
                stamp = _stamp(path)
            except OSError:
                return rel
            if known.get(rel) == stamp:  # recorded only when the hash matched, so the size matches too
                continue
            if stamp[0] != info["bytes"] or sha256_file(path) != info["sha256"]:
                return rel
            fresh[rel] = stamp
        if fresh:
            try:
                write_json_atomic(entry.path / VERIFIED, {**known, **fresh})
            except OSError:
                pass  # a read-only store is still verified, just every time
        return None

    def begin(self, key: str) -> Path:
        """A fresh private folder to build the entry in; its outputs go in <folder>/out."""
        folder = self.tmp / f"{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        (folder / "out").mkdir(parents=True)
        return folder

    def commit(self, key: str, folder: Path, meta: dict[str, Any]) -> Entry:
        table = file_table(folder / "out")
        meta = {**meta, "key": key, "files": table, "output_hash": tree_hash(table), "committed_at": time.time()}
        write_json_atomic(folder / META, meta)
        # Just hashed: the files are known right as they are (renaming their folder changes no stamp).
        write_json_atomic(folder / VERIFIED, {rel: _stamp(folder / "out" / rel) for rel in table})
        final = self.entry_path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists() and self.lookup(key) is None and final.exists():
            move_aside(final)  # damaged so that lookup did not evict it (e.g. meta.json unreadable): replace it
        try:
            os.rename(folder, final)
        except OSError:
            existing = self.lookup(key)
            if existing is None:
                raise
            shutil.rmtree(folder, ignore_errors=True)
            return existing
        return Entry(key, final, meta)

    def abandon(self, folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)

    def clean_stale(self) -> int:
        """Remove build folders left by processes that no longer run (e.g. a run killed with SIGKILL)."""
        removed = 0
        if not self.tmp.is_dir():
            return 0
        for folder in self.tmp.iterdir():
            parts = folder.name.split(".")
            pid = int(parts[1]) if len(parts) >= 3 and parts[1].isdigit() else None
            if pid is None or not _pid_alive(pid):
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        return removed

    def verify(self) -> list[str]:
        """Every problem in the store: entries whose files do not match their recorded sha256."""
        problems = []
        if not self.steps.is_dir():
            return problems
        for path in sorted(self.steps.glob("*/*")):
            if ".damaged." in path.name:
                continue
            entry = self._read(path.name)  # not lookup: report damage, do not evict it
            if entry is None:
                problems.append(f"{path}: incomplete or damaged entry")
                continue
            on_disk = {p.relative_to(entry.out).as_posix() for p in entry.out.rglob("*") if p.is_file()}
            if on_disk != set(entry.meta["files"]):
                problems.append(f"{path}: files differ from meta.json")
            for rel, info in entry.meta["files"].items():
                if rel in on_disk and sha256_file(entry.out / rel) != info["sha256"]:
                    problems.append(f"{path}/out/{rel}: sha256 differs from meta.json")
        return problems
