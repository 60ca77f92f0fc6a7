"""Ray replicas: document affinity, restart after a killed worker, the pipeline over Ray."""

import os
import signal

import pytest

from workers.host import EngineSpec, WorkRequest
from workers.pool import RayPool, iter_results
from workers.router import Router

pytestmark = pytest.mark.ray


def _requests(doc, n, base=0):
    return [WorkRequest(f"{doc}/map/{i}", [base + i + 5] * (10 + i), {"max_tokens": 4, "temperature": 0.0},
                        routing_key=doc) for i in range(n)]


def test_router_affinity_and_balance():
    router = Router(2)
    assert router.route("a", 100) == 0
    assert router.route("b", 10) == 1
    assert router.route("a", 100) == 0  # sticky
    assert router.route("c", 10) == 1  # least outstanding tokens
    router.complete("a", 0, 100)
    router.complete("a", 0, 100)
    router.release("a")
    assert "a" not in router.key_to_replica


def test_documents_stay_on_one_replica(ray_session, tiny_model_dir):
    spec = EngineSpec(model=str(tiny_model_dir), dtype="float32", num_threads=1)
    pool = RayPool(spec, num_replicas=2, num_cpus=1)
    try:
        for d in range(4):
            pool.submit(_requests(f"doc{d}", 3, base=d))
        results = list(iter_results(pool))
        assert len(results) == 12 and not any(r.error for r in results)
        replicas = {}
        for r in results:
            replicas.setdefault(r.request_id.split("/")[0], set()).add(r.replica)
        assert all(len(s) == 1 for s in replicas.values()), replicas
        assert {next(iter(s)) for s in replicas.values()} == {0, 1}  # both replicas used
        stats = pool.stats()
        assert len(stats) == 2 and all("prefix_cache_hit_rate" in s for s in stats)
    finally:
        pool.close()


def test_killed_worker_is_restarted_and_its_requests_retried(ray_session, tiny_model_dir):
    spec = EngineSpec(model=str(tiny_model_dir), dtype="float32", num_threads=1,
                      engine={"max_num_seqs": 2})
    pool = RayPool(spec, num_replicas=1, num_cpus=1)
    try:
        reqs = [WorkRequest(f"d/map/{i}", [7] * 20, {"max_tokens": 40, "temperature": 0.0,
                                                     "ignore_eos": True}, routing_key="d")
                for i in range(8)]
        pool.submit(reqs)
        (pid,) = pool.replica_pids()
        got = pool.results(timeout=30)
        os.kill(pid, signal.SIGKILL)
        results = got + list(iter_results(pool))
        assert sorted(r.request_id for r in results) == sorted(r.request_id for r in reqs)
        assert pool.num_restarts == 1 and pool.num_retried_requests > 0
        assert pool.replica_pids()[0] != pid
    finally:
        pool.close()


def test_pipeline_over_ray_chunks_in_tasks(ray_session, tiny_model_dir, tmp_path):
    """Over Ray, documents are chunked in Ray tasks beside the replica; the rows equal an
    in-process run's, and an empty document still becomes its error row."""
    from pipeline.chunking import chunk_text
    from pipeline.config import RunConfig
    from pipeline.output import read_results
    from pipeline.service import engine_spec, run_documents
    from pipeline.stores import open_store

    store = tmp_path / "store"
    store.mkdir()
    words = "The whale surfaced near the ship. The crew watched in silence. "
    for i in range(3):
        (store / f"doc{i}.txt").write_text(f"Document {i}. " + words * (40 + 30 * i))
    (store / "empty.txt").write_text("")
    config = RunConfig(model=str(tiny_model_dir), dtype="float32", max_summary_tokens=6,
                       chunk_tokens=128, overlap=16, max_num_batched_tokens=4096)
    pool = RayPool(engine_spec(config), num_replicas=1, num_cpus=1)
    try:
        stats, _ = run_documents(config, open_store(store), tmp_path / "ray.parquet", pool=pool)
        assert chunk_text in pool._remote_fns and pool.num_tasks == 0
    finally:
        pool.close()
    local_stats, _ = run_documents(RunConfig(**{**config.to_dict(), "use_ray": False}),
                                   open_store(store), tmp_path / "local.parquet")
    over_ray = sorted(read_results(tmp_path / "ray.parquet"), key=lambda r: r["doc_id"])
    local = sorted(read_results(tmp_path / "local.parquet"), key=lambda r: r["doc_id"])
    keep = ["doc_id", "status", "error", "summary", "num_chunks", "num_tokens", "generated_tokens"]
    assert [{k: r[k] for k in keep} for r in over_ray] == [{k: r[k] for k in keep} for r in local]
    assert [r["status"] for r in over_ray] == ["ok", "ok", "ok", "error"]
    assert "empty" in over_ray[-1]["error"]
    assert stats.num_chunks > 3  # several chunks per document


def test_task_errors_come_back_as_messages(ray_session, tiny_model_dir):
    pool = RayPool(EngineSpec(model=str(tiny_model_dir), dtype="float32", num_threads=1))
    try:
        import json
        pool.submit_task(json.loads, ("not json",), "t")
        results = []
        for _ in range(200):
            results += pool.task_results()
            if results:
                break
            import time
            time.sleep(0.05)
        assert results == [("t", None, "JSONDecodeError: Expecting value: line 1 column 1 (char 0)")]
    finally:
        pool.close()


def test_a_request_that_kills_its_replica_fails_its_document_only(ray_session, tiny_model_dir, tmp_path):
    """The replica process dies (os._exit) whenever one request is in its engine: after three
    restarts that request is its document's error row; every other document is ok."""
    import dataclasses

    from pipeline.config import RunConfig
    from pipeline.output import read_results
    from pipeline.prompts import PROMPT_VERSION
    from pipeline.runner import doc_key
    from pipeline.service import describe, engine_spec, run_documents
    from pipeline.stores import Document, content_hash

    config = RunConfig(model=str(tiny_model_dir), dtype="float32", max_summary_tokens=6,
                       chunk_tokens=64, overlap=8, max_num_batched_tokens=4096)
    text = "The whale surfaced near the ship, and the crew watched it for an hour. " * 12
    docs = [Document(d, f"mem:{d}", text + d, content_hash(text + d)) for d in ("a", "b", "c")]
    fingerprint = config.fingerprint(describe(config).weights_hash, PROMPT_VERSION)
    poison = f"{doc_key(docs[1], fingerprint)}/map/0"

    def hook(engine):  # defined here so it is pickled by value into the actor
        step = engine.step

        def dying_step():
            if poison in engine.requests:
                os._exit(1)
            return step()

        engine.step = dying_step

    pool = RayPool(dataclasses.replace(engine_spec(config), engine_hook=hook), num_replicas=1,
                   num_cpus=1, restart_timeout_s=120)
    try:
        stats, _ = run_documents(config, docs, tmp_path / "out.parquet", pool=pool)
    finally:
        pool.close()
    rows = {r["doc_id"]: r for r in read_results(tmp_path / "out.parquet")}
    assert sorted(rows) == ["a", "b", "c"]
    assert rows["b"]["status"] == "error" and "poison request: replica 0 died" in rows["b"]["error"]
    assert rows["a"]["status"] == "ok" and rows["c"]["status"] == "ok", stats.errors
    assert pool.num_restarts == 3
    assert pool.router.key_to_replica == {} and pool.num_inflight == 0


def test_router_spreads_keyless_requests_within_a_pool():
    router = Router(3, ["a", "b", "b"])
    assert router.route("", 100, "b") == 1 and router.route("", 100, "b") == 2  # spread
    assert router.route("", 10, "") == 0  # "" is the first pool
    assert router.route("d#0", 10, "b") == 1 and router.route("d#0", 10, "b") == 1  # affinity
    assert router.route("d#1", 10, "b") == 2
    router.complete("d#0", 1, 10)
    router.complete("d#0", 1, 10)
    router.complete("d#1", 2, 10)
    router.release("d")
    assert router.key_to_replica == {} and router.group_to_keys == {}


def test_two_pools_on_ray_and_one_document_spread_over_replicas(ray_session, tiny_model_dir):
    """Requests go to the pool they name; keyless requests of one document use both
    replicas of a pool."""
    from workers.pool import PoolSpec

    spec = EngineSpec(model=str(tiny_model_dir), dtype="float32", num_threads=1)
    pool = RayPool(pools=[PoolSpec("a", spec, 2, 1.0)])
    try:
        reqs = [WorkRequest(f"doc/map/{i}", [i + 5] * 30, {"max_tokens": 3, "temperature": 0.0},
                            pool="a") for i in range(6)]
        pool.submit(reqs)
        results = list(iter_results(pool))
        assert not any(r.error for r in results)
        assert {r.replica for r in results} == {0, 1}
        assert [s["pool"] for s in pool.stats()] == ["a", "a"]
    finally:
        pool.close()
    pool = RayPool(pools=[PoolSpec("a", spec, 1, 1.0), PoolSpec("b", spec, 1, 1.0)])
    try:
        pool.submit([WorkRequest("x/map/0", [5] * 20, {"max_tokens": 2}, pool="b"),
                     WorkRequest("y/map/0", [6] * 20, {"max_tokens": 2})])
        by_id = {r.request_id: r.replica for r in iter_results(pool)}
        assert by_id == {"x/map/0": 1, "y/map/0": 0}
        assert [s["pool"] for s in pool.stats()] == ["a", "b"]
    finally:
        pool.close()
