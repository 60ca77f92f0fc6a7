"""Model replicas behind one interface: `submit(requests)`, `results()`, `stats()`, `close()`.

`LocalPool` runs one engine in this process (tests, single-machine runs without Ray).
`RayPool` runs one `EngineActor` per replica (`num_gpus` each on GPU clusters), routes each
document to one replica, and replaces a replica whose process dies, resubmitting the requests
it held so the run completes; `num_restarts` counts those events.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from workers.host import EngineHost, EngineSpec, WorkRequest, WorkResult
from workers.router import Router

logger = logging.getLogger(__name__)


class LocalPool:
    def __init__(self, spec: EngineSpec, engine=None) -> None:
        self.host = EngineHost(spec, replica=0, engine=engine)
        self.num_replicas = 1
        self.num_restarts = 0
        self.num_retried_requests = 0
        self.num_inflight = 0
        self.key_to_replica: dict[str, int] = {}

    def submit(self, requests: list[WorkRequest]) -> None:
        for r in requests:
            self.key_to_replica[r.routing_key] = 0
        self.num_inflight += len(requests)
        self.host.submit(requests)

    def results(self, timeout: float = 1.0) -> list[WorkResult]:
        done = self.host.collect(timeout)
        self.num_inflight -= len(done)
        return done

    def stats(self) -> list[dict[str, Any]]:
        return [self.host.stats()]

    def close(self) -> None:
        self.host.shutdown()


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

    return EngineActor


class RayPool:
    def __init__(self, spec: EngineSpec, num_replicas: int = 1, num_cpus: float = 1,
                 num_gpus: float = 0, max_restarts: int = 3) -> None:
        import ray

        self.spec = spec
        self.num_replicas = num_replicas
        self.options = dict(num_cpus=num_cpus, num_gpus=num_gpus)
        self.max_restarts = max_restarts
        self.num_restarts = 0
        self.num_retried_requests = 0
        self.router = Router(num_replicas)
        self.inflight: list[dict[str, WorkRequest]] = [{} for _ in range(num_replicas)]
        self.actors = [self._start(i) for i in range(num_replicas)]
        self.pending: dict[Any, int] = {}  # collect() future -> replica
        self.tasks: dict[Any, Any] = {}  # submit_task() future -> tag
        self._remote_fns: dict[Callable, Any] = {}
        ray.get([a.ready.remote() for a in self.actors])

    def _start(self, replica: int):
        return _actor_class().options(**self.options).remote(self.spec, replica)

    @property
    def num_inflight(self) -> int:
        return sum(len(m) for m in self.inflight)

    @property
    def key_to_replica(self) -> dict[str, int]:
        return self.router.key_to_replica

    def submit(self, requests: list[WorkRequest]) -> None:
        by_replica: dict[int, list[WorkRequest]] = {}
        for r in requests:
            i = self.router.route(r.routing_key, len(r.prompt_token_ids))
            self.inflight[i][r.request_id] = r
            by_replica.setdefault(i, []).append(r)
        for i, reqs in by_replica.items():
            self.actors[i].submit.remote(reqs)

    def _restart(self, replica: int, cause: Exception) -> None:
        import ray

        if self.num_restarts >= self.max_restarts:
            raise RuntimeError(
                f"replica {replica} died and the restart budget ({self.max_restarts}) is spent: {cause}"
            ) from cause
        self.num_restarts += 1
        logger.warning("replica %d died (%s); restarting and resubmitting %d requests",
                       replica, type(cause).__name__, len(self.inflight[replica]))
        try:
            ray.kill(self.actors[replica])
        except Exception:  # already gone
            pass
        self.actors[replica] = self._start(replica)
        ray.get(self.actors[replica].ready.remote())
        self.router.reassign(replica)
        held = list(self.inflight[replica].values())
        self.num_retried_requests += len(held)
        for r in held:
            self.router.outstanding_tokens[replica] += len(r.prompt_token_ids)
        if held:
            self.actors[replica].submit.remote(held)

    def results(self, timeout: float = 1.0) -> list[WorkResult]:
        import ray
        from ray.exceptions import RayActorError

        for i in range(self.num_replicas):
            if self.inflight[i] and i not in self.pending.values():
                self.pending[self.actors[i].collect.remote(min(timeout, 1.0))] = i
        if not self.pending:
            time.sleep(min(timeout, 0.05))
            return []
        ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=timeout + 5)
        done: list[WorkResult] = []
        for ref in ready:
            i = self.pending.pop(ref)
            try:
                results = ray.get(ref)
            except RayActorError as exc:
                self._restart(i, exc)
                continue
            for res in results:
                req = self.inflight[i].pop(res.request_id, None)
                if req is None:
                    continue  # a duplicate from before a restart
                self.router.complete(req.routing_key, i, len(req.prompt_token_ids))
                done.append(res)
        return done

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
        for s in stats:
            s["num_retried_requests"] = self.num_retried_requests
        return stats

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
