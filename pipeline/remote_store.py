"""The step store at an fsspec URL, for workers that share no disk with the runner or with each other.

    <url>/blobs/<sha256[:2]>/<sha256>      every output file, named by its content
    <url>/steps/<key[:2]>/<key>.json       one entry: its meta.json, whose `files` table names the blobs

An entry is pushed blobs first and meta last, so a reader that finds the meta finds every blob it names; a
worker killed mid-upload leaves at most unreferenced blobs, never an entry. The meta is created exclusively
(never overwritten), so the first complete write of a key wins; a later writer of the same key drops its copy
and reuses the winner, and every process agrees on the key's output hash.

Each process keeps its own local Store as a cache (MirroredStore): a lookup that misses locally pulls the entry
(every file sha256-checked) into it, and a commit is pushed before it becomes visible locally. Stages keep
reading and writing plain local Paths.

Which URLs: anything fsspec opens. `file:///mnt/shared/kiln-store` (an NFS or other shared mount; in the tests
a folder the workers reach only through this URL); `s3://bucket/kiln` with s3fs installed, `gs://` with gcsfs,
`abfs://` with adlfs, credentials from those libraries' usual environment variables or config files. Exclusive
creation is `os.link` on local filesystems and an `xb` (if-none-match) write on object stores whose fsspec
driver supports it; on one that does not, two writers finishing the same key at the same instant both leave a
complete entry and the last one stays. `memory://` lives inside one process and cannot serve several workers.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from pipeline.errors import BadInput, KilnError
from pipeline.hashing import file_table, sha256_file, tree_hash
from pipeline.store import Entry, Store, move_aside

_LOCAL_ONLY = ("memory",)


class RemoteStore:
    def __init__(self, url: str):
        try:
            import fsspec

            self.fs, self.root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as exc:
            raise BadInput(
                f"--store-url {url}: fsspec cannot open it ({exc}); install the filesystem's package "
                "(s3fs for s3://, gcsfs for gs://, adlfs for abfs://)"
            ) from None
        protocols = {self.fs.protocol} if isinstance(self.fs.protocol, str) else set(self.fs.protocol)
        if protocols & set(_LOCAL_ONLY):
            raise BadInput(f"--store-url {url}: lives in one process only; use a shared folder (file://) or an object store")
        self.url = url
        self.local = bool(protocols & {"file", "local"})  # plain OS paths: rename and link are atomic

    def _blob(self, sha256: str) -> str:
        return f"{self.root}/blobs/{sha256[:2]}/{sha256}"

    def _meta_path(self, key: str) -> str:
        return f"{self.root}/steps/{key[:2]}/{key}.json"

    def meta(self, key: str) -> dict[str, Any] | None:
        """The entry's meta if it is there and whole."""
        try:
            with self.fs.open(self._meta_path(key), "rb") as handle:
                return json.loads(handle.read())
        except FileNotFoundError:
            return None
        except ValueError:  # only while an object store without exclusive writes is mid-write
            return None

    def push(self, out: Path, meta: dict[str, Any]) -> dict[str, Any]:
        """Upload an entry's files, then its meta unless the key is already there; returns the winning meta."""
        for rel, info in meta["files"].items():
            self._put_blob(out / rel, info["sha256"])
        return self._put_meta(meta)

    def _put_blob(self, path: Path, sha256: str) -> None:
        dest = self._blob(sha256)
        if self.fs.exists(dest):  # same name, same content
            return
        self.fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
        if self.local:
            tmp = f"{dest}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
            self.fs.put_file(str(path), tmp)
            self.fs.mv(tmp, dest)
        else:
            self.fs.put_file(str(path), dest)  # an object store PUT is atomic: the object is whole or absent

    def _put_meta(self, meta: dict[str, Any]) -> dict[str, Any]:
        key = meta["key"]
        existing = self.meta(key)
        if existing is not None:
            return existing
        path = self._meta_path(key)
        data = (json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n").encode()
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        if self.local:
            tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
            Path(tmp).write_bytes(data)
            try:
                os.link(tmp, path)  # atomic, and fails when the key exists: the first complete write wins
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
        else:
            try:
                with self.fs.open(path, "xb") as handle:
                    handle.write(data)
            except FileExistsError:
                pass
            except (ValueError, NotImplementedError, TypeError):  # the driver has no exclusive create
                self.fs.pipe_file(path, data)
        for _ in range(100):  # an object store may show the winner's object a moment later
            won = self.meta(key)
            if won is not None:
                return won
            time.sleep(0.1)
        raise KilnError(f"{self.url}: entry {key} was written but cannot be read back; check the store's permissions")

    def pull(self, key: str, store: Store) -> Entry | None:
        """Copy the entry for key into the local store (every file sha256-checked); None when there is none."""
        meta = self.meta(key)
        if meta is None:
            return None
        folder = store.begin(key)
        try:
            for rel, info in meta["files"].items():
                dest = folder / "out" / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    self.fs.get_file(self._blob(info["sha256"]), str(dest))
                except FileNotFoundError:
                    raise KilnError(f"{self.url}: entry {key} names a missing file {rel}; remove "
                                    f"{self._meta_path(key)} so the step is built again") from None
                if sha256_file(dest) != info["sha256"]:
                    raise KilnError(f"{self.url}: blob {info['sha256'][:12]} ({rel} of entry {key}) is damaged; "
                                    f"remove {self._blob(info['sha256'])} and {self._meta_path(key)}")
        except BaseException:
            store.abandon(folder)
            raise
        base = {k: v for k, v in meta.items() if k not in ("key", "files", "output_hash", "committed_at")}
        return store.commit(key, folder, base)

    def verify(self) -> list[str]:
        """Every entry whose blobs are missing or have another size than its meta records."""
        problems = []
        for path in sorted(self.fs.glob(f"{self.root}/steps/*/*.json")):
            key = path.rsplit("/", 1)[1][: -len(".json")]
            meta = self.meta(key)
            if meta is None:
                problems.append(f"{path}: unreadable entry")
                continue
            for rel, info in meta["files"].items():
                try:
                    size = self.fs.size(self._blob(info["sha256"]))
                except FileNotFoundError:
                    size = None
                if size != info["bytes"]:
                    problems.append(f"{path}: {rel}: blob {info['sha256'][:12]} missing or of another size")
        return problems


class MirroredStore:
    """A local Store that is a cache of a RemoteStore; the same interface the runner and workers use."""

    def __init__(self, local: Store, remote: RemoteStore):
        self.local = local
        self.remote = remote
        self.root = local.root
        self.evicted = local.evicted  # the local copy is verified as a Store verifies; a damaged one is pulled again

    def lookup(self, key: str) -> Entry | None:
        entry = self.local.lookup(key)
        if entry is None:
            return self.remote.pull(key, self.local)
        shared = self.remote.meta(key)
        if shared is None:  # built here before the shared store was used: share it, so workers find it
            shared = self.remote.push(entry.out, entry.meta)
        if shared["output_hash"] != entry.output_hash:
            # Another complete build of the key got into the shared store first; it is the one everyone uses.
            move_aside(entry.path)
            return self.remote.pull(key, self.local)
        return entry

    def begin(self, key: str) -> Path:
        return self.local.begin(key)

    def abandon(self, folder: Path) -> None:
        self.local.abandon(folder)

    def commit(self, key: str, folder: Path, meta: dict[str, Any]) -> Entry:
        table = file_table(folder / "out")
        full = {**meta, "key": key, "files": table, "output_hash": tree_hash(table), "committed_at": time.time()}
        won = self.remote.push(folder / "out", full)
        if won["output_hash"] != full["output_hash"]:  # another writer completed the key first: reuse theirs
            self.local.abandon(folder)
            found = self.lookup(key)
            assert found is not None, f"entry {key} vanished from {self.remote.url}"
            return found
        return self.local.commit(key, folder, meta)

    def clean_stale(self) -> int:
        return self.local.clean_stale()

    def verify(self) -> list[str]:
        return self.local.verify() + self.remote.verify()
