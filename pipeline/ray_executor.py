"""Steps as Ray tasks. `--executor ray` starts a Ray cluster on this machine for the run (`--jobs` CPUs) and stops
it after; `--executor ray=ADDRESS` joins an existing cluster (`ray start --head` prints its address; `auto`
finds one started on this machine) and leaves it running.

Each step is one task that asks for the resources the step declares (Step.resources: num_cpus, num_gpus,
memory in bytes, custom ones such as "target:cuda"; empty = 1 CPU), so a CUDA tuning step lands on a node
started with `--num-gpus 1 --resources '{"target:cuda": 1}'` and a CPU step anywhere. Before a step is sent,
its needs are checked against the live nodes: a step that no node can take fails at once as Unschedulable,
naming what it needs and what the nodes offer, rather than waiting forever in Ray's queue; the check is
repeated while it waits, since a node may leave.

Workers that share no disk with the runner need a store URL (--store-url, pipeline/remote_store.py): the task
then carries store keys and no paths; each worker pulls its inputs into its own cache and pushes its outputs.
Without one, every worker must see the artifacts folder at the same path (this machine, or a shared mount).
Every node needs modelkiln installed with the same tool versions as the runner (they are in the cache keys;
a worker with other versions refuses the step).

A worker process that dies mid-step (killed, out of memory, its node lost) is retried by Ray on another
worker, up to KILN_RAY_RETRIES times (default 2). Its half-built folder was private, so nothing partial is
published. A stage that raises is not retried: its error fails the recipes that depend on the step.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline.errors import BadInput, KilnError, StageCrashed, Unschedulable, first_line
from pipeline.executor import Task, execute
from pipeline.store import Store

RETRIES = int(os.environ.get("KILN_RAY_RETRIES", "2"))
RECHECK_S = 5.0  # how often waiting steps are checked against the live nodes again
LOCAL_OBJECT_STORE = 200 * 1024**2  # a cluster kiln starts passes only small dicts between processes
_STANDARD = {"num_cpus": "CPU", "num_gpus": "GPU", "memory": "memory"}


def ray_needs(resources: dict[str, float]) -> dict[str, float]:
    """A step's resources in Ray's names (CPU, GPU, memory, custom); empty means one CPU."""
    needs = {"CPU": 1.0}
    for name, amount in resources.items():
        needs[_STANDARD.get(name, name)] = float(amount)
    return {name: amount for name, amount in needs.items() if amount}


def _options(needs: dict[str, float]) -> dict[str, Any]:
    options: dict[str, Any] = {"num_cpus": needs.get("CPU", 0), "num_gpus": needs.get("GPU", 0)}
    if "memory" in needs:
        options["memory"] = needs["memory"]
    custom = {name: amount for name, amount in needs.items() if name not in ("CPU", "GPU", "memory")}
    if custom:
        options["resources"] = custom
    return options


def _describe(resources: dict[str, float]) -> str:
    parts = []
    for name, amount in sorted(resources.items()):
        if name.startswith("node:") or name == "object_store_memory":
            continue
        parts.append(f"{name}={amount / 1024**3:.1f}GiB" if name == "memory" else f"{name}={amount:g}")
    return ", ".join(parts)


def unschedulable(needs: dict[str, float], nodes: list[dict]) -> str | None:
    """Why no live node can run a step with these needs, or None when one can."""
    alive = [node for node in nodes if node.get("Alive")]
    for node in alive:
        if all(node.get("Resources", {}).get(name, 0.0) >= amount for name, amount in needs.items()):
            return None
    offered = "; ".join(f"{n.get('NodeManagerAddress', '?')}: {_describe(n.get('Resources', {}))}" for n in alive)
    return (f"needs {_describe(needs)} and no node of the Ray cluster offers that ({offered or 'no live node'}); "
            "add a node with those resources (ray start --num-gpus/--resources) or leave the step's target out")


def _worker(task: Task) -> dict[str, Any]:
    """What a Ray worker runs for one step."""
    from pipeline.versions import versions

    here = versions(list(task.tools))
    differ = [f"{name} {here[name]} (runner: {version})" for name, version in task.tools.items() if here[name] != version]
    if differ:
        raise KilnError(f"{task.step_id}: worker {socket.gethostname()} has {', '.join(differ)}; the step's cache key "
                        "names the runner's versions; install the same versions (constraints.txt) on every node")
    if task.store_url:  # this node's own cache: a build folder whose process is gone (a killed attempt) is stale
        Store(Path(task.store_root)).clean_stale()
    return execute(task, worker={"host": socket.gethostname(), "pid": os.getpid()})


def _check_reachable(address: str) -> None:
    """Ray waits minutes for an address where nothing listens; a plain connect says so in seconds."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # `auto`: Ray looks for a cluster started on this machine and says at once if there is none
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise BadInput(f"--executor ray={address}: nothing answers at {host}:{port} ({exc.strerror or exc}); "
                       "start a cluster there with `ray start --head` or fix the address") from None


class RayExecutor:
    """Joins (or starts) the cluster at the first step that has to run, so an all-cached run starts nothing."""

    def __init__(self, address: str | None = None, jobs: int = 1, store_url: str | None = None):
        import ray  # here, so a missing Ray is reported before anything runs

        self._ray = ray
        self.address, self.jobs, self.store_url = address, jobs, store_url
        self._owns: bool | None = None  # None: not connected yet
        cache = os.environ.get("KILN_RAY_WORKER_CACHE") or os.path.join(tempfile.gettempdir(), "kiln-ray-cache")
        self.worker_store = os.path.join(cache, hashlib.sha256((store_url or "").encode()).hexdigest()[:16])
        self._remote = ray.remote(max_retries=RETRIES, retry_exceptions=False)(_worker)
        self._waiting: dict[Any, tuple[Future, Task, dict[str, float]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def capacity(self) -> int:
        """Steps in flight: --jobs, or the cluster's CPU count once joined if that is more (Ray queues the rest)."""
        if self._owns is None:
            return self.jobs
        return max(self.jobs, int(self._ray.cluster_resources().get("CPU", 1)))

    def _connect(self) -> None:
        if self._owns is not None:
            return
        ray, address = self._ray, self.address
        self._owns = not ray.is_initialized()  # a caller that already joined a cluster keeps it
        if not self._owns:
            return
        try:
            if address:
                _check_reachable(address)
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
            else:
                # address="local": always a new cluster of our own, never one found on this machine
                ray.init(address="local", num_cpus=self.jobs, include_dashboard=False,
                         object_store_memory=LOCAL_OBJECT_STORE, log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            self._owns = False
            raise BadInput(f"--executor ray={address}: no Ray cluster reachable there ({first_line(exc)}); "
                           "start one with `ray start --head` and pass the address it prints") from None

    def submit(self, task: Task) -> Future:
        self._connect()
        future: Future = Future()
        needs = ray_needs(task.resources)
        reason = unschedulable(needs, self._ray.nodes())
        if reason:
            future.set_exception(Unschedulable(f"{task.step_id} {reason}"))
            return future
        if self.store_url:  # the worker shares no disk with us: keys only, and its own cache
            task = replace(task, inputs={}, store_root=self.worker_store)
        ref = self._remote.options(name=task.step_id, **_options(needs)).remote(task)
        with self._lock:
            self._waiting[ref] = (future, task, needs)
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="kiln-ray-watch", daemon=True)
            self._thread.start()
        return future

    def _watch(self) -> None:
        """Hand each finished task's result to its future; fail waiting steps no live node can take."""
        ray = self._ray
        checked = time.monotonic()
        while not self._stop.is_set():
            with self._lock:
                refs = list(self._waiting)
            if not refs:
                self._stop.wait(0.1)
                continue
            ready, _ = ray.wait(refs, num_returns=1, timeout=0.5, fetch_local=False)
            for ref in ready:
                with self._lock:
                    future, task, _ = self._waiting.pop(ref)
                try:
                    future.set_result(ray.get(ref))
                except Exception as exc:  # noqa: BLE001 - every failure reaches the runner as a KilnError
                    future.set_exception(self._error(task, exc))
            if time.monotonic() - checked > RECHECK_S:
                checked = time.monotonic()
                nodes = ray.nodes()
                with self._lock:
                    lost = [(r, w) for r, w in self._waiting.items() if unschedulable(w[2], nodes)]
                    for ref, _ in lost:
                        del self._waiting[ref]
                for ref, (future, task, needs) in lost:
                    ray.cancel(ref, force=True)
                    future.set_exception(Unschedulable(f"{task.step_id} {unschedulable(needs, nodes)}"))

    def _error(self, task: Task, exc: Exception) -> KilnError:
        from ray import exceptions

        if isinstance(exc, exceptions.RayTaskError):
            cause = exc.cause
            if isinstance(cause, KilnError):
                return cause
            return StageCrashed(f"{task.step_id}: {type(cause).__name__}: {first_line(cause)}")
        if isinstance(exc, exceptions.TaskCancelledError):
            return StageCrashed(f"{task.step_id}: the Ray task was cancelled")
        return StageCrashed(
            f"{task.step_id}: its Ray worker was lost on all {RETRIES + 1} attempt(s) ({type(exc).__name__}: {first_line(exc)}); "
            "nothing was published for it; the node's Ray logs say why (memory, a native crash, a lost node)"
        )

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        with self._lock:
            waiting, self._waiting = self._waiting, {}
        for ref, (future, _, _) in waiting.items():
            self._ray.cancel(ref, force=True)
            future.cancel()
        if self._owns:
            self._ray.shutdown()
        self._owns = None
