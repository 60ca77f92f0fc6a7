"""Model replicas behind one interface: `submit(requests)`, `results()`, `stats()`, `close()`.

A pool set holds one or more named model pools (`PoolSpec`: an engine spec and its replica
count); each request names its pool (`WorkRequest.pool`, "" for the first) and the router
picks a replica of it. `LocalPool` runs one engine per pool in this process (tests,
single-machine runs without Ray). `RayPool` runs one `EngineActor` per replica (`num_gpus`
each on GPU clusters). Both replace a replica that fails (its process dies, or its engine
thread raises) and resubmit the requests it held; a request blamed for `max_attempts`
failures comes back as an error result instead (`workers.faults`), so one poison request
fails its document, not the run. `num_restarts` counts the restarts; a restart that does not
come up within `restart_timeout_s` raises `ReplicaStartTimeout`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from workers.faults import MAX_ATTEMPTS, RequestFaults
from workers.host import EngineFailed, EngineHost, EngineSpec, WorkRequest, WorkResult
from workers.router import Router

logger = logging.getLogger(__name__)

# How long a restarted replica may take to load its model and answer before the pool gives up.
RESTART_TIMEOUT_S = 600.0


class ReplicaStartTimeout(RuntimeError):
    pass


@dataclass(slots=True)
class PoolSpec:
    """One named model pool: what each replica builds, how many, and their resources."""

    name: str
    engine: EngineSpec
    num_replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0


def _pool_specs(spec: EngineSpec | None, pools: list[PoolSpec] | None, num_replicas: int = 1,
                num_cpus: float = 1.0, num_gpus: float = 0.0) -> list[PoolSpec]:
    if pools is None:
        assert spec is not None, "give an EngineSpec or a list of PoolSpec"
        return [PoolSpec("default", spec, num_replicas, num_cpus, num_gpus)]
    assert pools and len({p.name for p in pools}) == len(pools), "pools need distinct names"
    return pools


class _Replicas:
    """What both pools share: routing, the requests each replica holds, faults, aborts.

    `inflight[i]` holds every request routed to replica i and not yet finished (sent, or
    queued on probation in `faults`). A failed replica is restarted (`_restart_replica`) and
    `faults` decides which of its requests are resubmitted and which come back as poison.
    Subclasses send with `_send(i, reqs)` and abort with `_abort_on(i, ids)`."""

    def _init_replicas(self, pools: list[PoolSpec], max_attempts: int,
                       restart_timeout_s: float) -> None:
        # replica i: its pool; the first pool is the default ("" in a WorkRequest)
        self.replica_pool: list[PoolSpec] = [p for p in pools for _ in range(p.num_replicas)]
        num_replicas = len(self.replica_pool)
        self.num_replicas = num_replicas
        self.num_restarts = 0
        self.num_retried_requests = 0
        self.restart_timeout_s = restart_timeout_s
        self.router = Router(num_replicas, [p.name for p in self.replica_pool])
        self.faults = RequestFaults(num_replicas, max_attempts)
        self.inflight: list[dict[str, WorkRequest]] = [{} for _ in range(num_replicas)]
        self._poisoned: list[WorkResult] = []  # given up on, returned by the next results()

    @property
    def num_inflight(self) -> int:
        return sum(len(m) for m in self.inflight) + len(self._poisoned)

    @property
    def key_to_replica(self) -> dict[str, int]:
        return self.router.key_to_replica

    def submit(self, requests: list[WorkRequest]) -> None:
        by_replica: dict[int, list[WorkRequest]] = {}
        for r in requests:
            i = self.router.route(r.routing_key, len(r.prompt_token_ids), r.pool)
            self.inflight[i][r.request_id] = r
            by_replica.setdefault(i, []).append(r)
        for i, reqs in by_replica.items():
            self._send_now(i, reqs)

    def _send_now(self, i: int, reqs: list[WorkRequest]) -> None:
        now = self.faults.to_send(i, reqs)
        if now:
            self._send(i, now)

    def _finished(self, i: int, res: WorkResult) -> bool:
        """Book a result from replica i; False for one it no longer holds (a duplicate from
        before a restart, or an aborted request)."""
        req = self.inflight[i].pop(res.request_id, None)
        if req is None:
            return False
        self.router.complete(req.routing_key, i, len(req.prompt_token_ids))
        nxt = self.faults.finished(i, res.request_id)
        if nxt:
            self._send(i, nxt)
        return True

    def _replica_failed(self, i: int, cause: str) -> None:
        """Restart replica i, resubmit what it held, give up on poison requests."""
        held = list(self.inflight[i].values())
        logger.warning("replica %d failed (%s); restarting it, %d requests held", i, cause, len(held))
        self.num_restarts += 1
        self._restart_replica(i)
        self.router.reassign(i)
        for r in held:
            self.router.outstanding_tokens[i] += len(r.prompt_token_ids)
        retry, poisoned = self.faults.failed(i, held, cause)
        for res in poisoned:
            logger.error("request %s: %s", res.request_id, res.error)
            req = self.inflight[i].pop(res.request_id)
            self.router.complete(req.routing_key, i, len(req.prompt_token_ids))
            self._poisoned.append(res)
        self.num_retried_requests += len(retry)
        self._send_now(i, retry)  # with an empty list, still starts the next queued suspect

    def _take_poisoned(self) -> list[WorkResult]:
        out, self._poisoned = self._poisoned, []
        return out

    def abort(self, request_ids: list[str]) -> None:
        """Stop requests whose results are no longer wanted (their document failed)."""
        wanted = set(request_ids)
        for i in range(self.num_replicas):
            ids = [rid for rid in self.inflight[i] if rid in wanted]
            if not ids:
                continue
            for rid in ids:
                req = self.inflight[i].pop(rid)
                self.router.complete(req.routing_key, i, len(req.prompt_token_ids))
            self._abort_on(i, ids)
            nxt = self.faults.forget(i, set(ids))
            if nxt:
                self._send(i, nxt)

    def release(self, group: str) -> None:
        """A document is done: forget its routing keys (the router's maps stay bounded)."""
        self.router.release(group)

    def _label(self, i: int, stats: dict[str, Any]) -> dict[str, Any]:
        stats["pool"] = self.replica_pool[i].name
        stats["model"] = self.replica_pool[i].engine.model
        stats["replica"] = i
        stats["num_retried_requests"] = self.num_retried_requests
        return stats


class LocalPool(_Replicas):
    """One engine per pool in this process (a pool's `num_replicas` is taken as 1: the
    engines share this process's threads). An engine failure rebuilds that engine."""

    def __init__(self, spec: EngineSpec | None = None, engine=None,
                 max_attempts: int = MAX_ATTEMPTS, restart_timeout_s: float = RESTART_TIMEOUT_S,
                 pools: list[PoolSpec] | None = None) -> None:
        pools = [PoolSpec(p.name, p.engine, 1, p.num_cpus, p.num_gpus)
                 for p in _pool_specs(spec, pools)]
        assert engine is None or len(pools) == 1, "a prebuilt engine serves a one-pool set"
        self._init_replicas(pools, max_attempts, restart_timeout_s)
        self.hosts = [EngineHost(p.engine, replica=i, engine=engine if i == 0 else None)
                      for i, p in enumerate(self.replica_pool)]

    def _send(self, i: int, reqs: list[WorkRequest]) -> None:
        try:
            self.hosts[i].submit(reqs)
        except EngineFailed:
            pass  # they are held in `inflight`; the next results() restarts the engine

    def _abort_on(self, i: int, ids: list[str]) -> None:
        self.hosts[i].abort(ids)

    def _restart_replica(self, i: int) -> None:
        import threading

        self.hosts[i].shutdown()
        box: dict[str, Any] = {}
        spec = self.replica_pool[i].engine

        def build() -> None:
            try:
                box["host"] = EngineHost(spec, replica=i)
            except BaseException as exc:  # reported below
                box["error"] = exc

        t = threading.Thread(target=build, name="engine-rebuild", daemon=True)
        t.start()
        t.join(self.restart_timeout_s)
        if t.is_alive():
            raise ReplicaStartTimeout(
                f"replica {i} did not come up within {self.restart_timeout_s:g} s after its engine "
                f"failed (restart_timeout_s); check the model and the machine's memory")
        if "error" in box:
            raise RuntimeError(f"replica {i} could not be rebuilt: {box['error']}") from box["error"]
        self.hosts[i] = box["host"]

    def results(self, timeout: float = 1.0) -> list[WorkResult]:
        done = self._take_poisoned()
        busy = [i for i in range(self.num_replicas) if self.inflight[i]]
        if not busy:
            if not done:
                time.sleep(min(timeout, 0.05))
            return done
        # One busy engine: wait on it. Several: short waits in turn, until one has results.
        wait = timeout if len(busy) == 1 else min(timeout, 0.02)
        deadline = time.monotonic() + timeout
        while True:
            for i in busy:
                try:
                    got = self.hosts[i].collect(0 if done else wait)
                except EngineFailed as exc:
                    self._replica_failed(i, exc.cause)
                    return done + self._take_poisoned()
                done += [r for r in got if self._finished(i, r)]
            if done or time.monotonic() >= deadline:
                return done

    def stats(self) -> list[dict[str, Any]]:
        return [self._label(i, h.stats()) for i, h in enumerate(self.hosts)]

    def close(self) -> None:
        for h in self.hosts:
            h.shutdown()


def init_ray(address: str | None = None, num_cpus: int | None = None, quiet: bool = True) -> None:
    """Start (or join, with `address`) Ray with the dashboard off and logs quiet."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=not quiet,
                                  logging_level=logging.WARNING, configure_logging=True)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, dashboard_host="127.0.0.1", **kwargs)


def _actor_class():
    import ray

    @ray.remote(max_concurrency=4)
    class EngineActor:
        """One model replica: an EngineHost in its own process."""

        def __init__(self, spec: EngineSpec, replica: int) -> None:
            self.host = EngineHost(spec, replica)

        def ready(self) -> int:
            import os

            return os.getpid()

        def submit(self, requests: list[WorkRequest]) -> None:
            self.host.submit(requests)

        def collect(self, timeout: float) -> list[WorkResult]:
            return self.host.collect(timeout)

        def stats(self) -> dict[str, Any]:
            return self.host.stats()

        def abort(self, request_ids: list[str]) -> None:
            self.host.abort(request_ids)

    return EngineActor


class RayPool(_Replicas):
    def __init__(self, spec: EngineSpec | None = None, num_replicas: int = 1, num_cpus: float = 1,
                 num_gpus: float = 0, max_attempts: int = MAX_ATTEMPTS,
                 restart_timeout_s: float = RESTART_TIMEOUT_S,
                 pools: list[PoolSpec] | None = None) -> None:
        import ray

        pools = _pool_specs(spec, pools, num_replicas, num_cpus, num_gpus)
        self._init_replicas(pools, max_attempts, restart_timeout_s)
        self.actors = [self._start(i) for i in range(self.num_replicas)]
        self.pending: dict[Any, int] = {}  # collect() future -> replica
        self.tasks: dict[Any, Any] = {}  # submit_task() future -> tag
        self._remote_fns: dict[Callable, Any] = {}
        ray.get([a.ready.remote() for a in self.actors])

    def _options(self, replica: int) -> dict[str, float]:
        p = self.replica_pool[replica]
        return dict(num_cpus=p.num_cpus, num_gpus=p.num_gpus)

    def _start(self, replica: int):
        return _actor_class().options(**self._options(replica)).remote(
            self.replica_pool[replica].engine, replica)

    def _send(self, i: int, reqs: list[WorkRequest]) -> None:
        # Fire and forget: if the replica is dead or its engine failed, the next collect says
        # so and the restart resubmits everything `inflight[i]` holds.
        self.actors[i].submit.remote(reqs)

    def _abort_on(self, i: int, ids: list[str]) -> None:
        self.actors[i].abort.remote(ids)

    def _restart_replica(self, i: int) -> None:
        import ray
        from ray.exceptions import GetTimeoutError

        try:
            ray.kill(self.actors[i])
        except Exception:  # already gone
            pass
        for ref in [r for r, j in self.pending.items() if j == i]:
            del self.pending[ref]
        self.actors[i] = self._start(i)
        try:
            ray.get(self.actors[i].ready.remote(), timeout=self.restart_timeout_s)
        except GetTimeoutError:
            raise ReplicaStartTimeout(
                f"replica {i} did not come up within {self.restart_timeout_s:g} s after a restart "
                f"(restart_timeout_s); check that the cluster has the CPUs/GPUs for it "
                f"({self._options(i)}) and that the model loads") from None

    def results(self, timeout: float = 1.0) -> list[WorkResult]:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        done = self._take_poisoned()
        for i in range(self.num_replicas):
            if self.inflight[i] and i not in self.pending.values():
                self.pending[self.actors[i].collect.remote(min(timeout, 1.0))] = i
        if not self.pending:
            if not done:
                time.sleep(min(timeout, 0.05))
            return done
        ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=0 if done else timeout + 5)
        for ref in ready:
            i = self.pending.pop(ref, None)
            if i is None:
                continue  # a collect of a replica restarted since
            try:
                results = ray.get(ref)
            except RayActorError as exc:  # the process died
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                self._replica_failed(i, f"replica {i} died ({type(exc).__name__}: {first})")
                continue
            except RayTaskError as exc:  # the engine thread raised
                cause = getattr(exc, "cause", None)
                why = cause.cause if isinstance(cause, EngineFailed) else f"{type(exc).__name__}"
                self._replica_failed(i, why)
                continue
            done += [res for res in results if self._finished(i, res)]
        return done + self._take_poisoned()

    # -- light CPU tasks beside the replicas (document chunking) ----------------------------
    def submit_task(self, fn: Callable, args: tuple, tag: Any) -> None:
        """Run `fn(*args)` as a Ray task; `(tag, value, error)` comes back from task_results.
        num_cpus=0: the tasks are light and must not wait for the CPUs the replicas hold."""
        import ray

        remote = self._remote_fns.get(fn)
        if remote is None:
            remote = self._remote_fns[fn] = ray.remote(num_cpus=0)(fn)
        self.tasks[remote.remote(*args)] = tag

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def task_results(self) -> list[tuple[Any, Any, str | None]]:
        """Finished tasks as (tag, value, None) or (tag, None, error message); never blocks."""
        import ray
        from ray.exceptions import RayTaskError

        if not self.tasks:
            return []
        ready, _ = ray.wait(list(self.tasks), num_returns=len(self.tasks), timeout=0)
        out = []
        for ref in ready:
            tag = self.tasks.pop(ref)
            try:
                out.append((tag, ray.get(ref), None))
            except RayTaskError as exc:
                cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                out.append((tag, None, f"{type(cause).__name__}: {cause}"))
        return out

    def replica_pids(self) -> list[int]:
        import ray

        return ray.get([a.ready.remote() for a in self.actors])

    def stats(self) -> list[dict[str, Any]]:
        import ray

        stats = ray.get([a.stats.remote() for a in self.actors])
        return [self._label(i, s) for i, s in enumerate(stats)]

    def close(self) -> None:
        import ray

        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:
                pass
        self.actors = []


def iter_results(pool, timeout: float = 1.0) -> Iterator[WorkResult]:
    while pool.num_inflight:
        yield from pool.results(timeout)
