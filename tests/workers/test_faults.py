"""Fault isolation per request, in process (LocalPool, no Ray): a poison request fails its
document only; a failed document's requests are aborted; finished documents leave the router;
a restart that never comes up fails clearly."""

import dataclasses
import threading
import time

import pytest

from pipeline.config import RunConfig
from pipeline.output import read_results
from pipeline.prompts import PROMPT_VERSION
from pipeline.runner import doc_key
from pipeline.service import describe, engine_spec, run_documents
from pipeline.stores import Document, content_hash
from workers.faults import RequestFaults
from workers.host import WorkRequest
from workers.pool import LocalPool, ReplicaStartTimeout

GOOD = "The whale surfaced near the ship, and the crew watched it for an hour. " * 12


def _config(model_dir) -> RunConfig:
    return RunConfig(model=str(model_dir), dtype="float32", use_ray=False, max_summary_tokens=6,
                     chunk_tokens=64, overlap=8, max_num_batched_tokens=4096)


def _docs():
    return [Document(d, f"mem:{d}", GOOD + d, content_hash(GOOD + d)) for d in ("a", "b", "c", "d")]


def _key(config, doc) -> str:
    return doc_key(doc, config.fingerprint(describe(config).weights_hash, PROMPT_VERSION))


def _run(config, docs, pool, tmp_path):
    out = tmp_path / "out.parquet"
    stats, _ = run_documents(config, docs, out, pool=pool)
    return stats, {r["doc_id"]: r for r in read_results(out, "parquet")}


def _assert_router_empty(pool):
    assert pool.router.key_to_replica == {} and pool.router.key_requests == {}
    assert pool.num_inflight == 0 and pool.router.outstanding_tokens == [0]


def test_poison_request_fails_its_document_only(tiny_model_dir, tmp_path):
    config = _config(tiny_model_dir)
    docs = _docs()
    poison = f"{_key(config, docs[1])}/map/0"

    def hook(engine):  # the engine thread raises whenever the poison request is in the engine
        step = engine.step

        def faulty_step():
            if poison in engine.requests:
                raise RuntimeError("boom in the kernel")
            return step()

        engine.step = faulty_step

    pool = LocalPool(dataclasses.replace(engine_spec(config), engine_hook=hook))
    try:
        stats, rows = _run(config, docs, pool, tmp_path)
    finally:
        pool.close()
    assert sorted(rows) == ["a", "b", "c", "d"]
    assert rows["b"]["status"] == "error"
    assert "poison request: RuntimeError: boom in the kernel" in rows["b"]["error"]
    assert all(rows[d]["status"] == "ok" for d in "acd"), stats.errors
    assert stats.num_failed == 1
    assert pool.num_restarts == 3  # three strikes for the poison request, a rebuild each
    assert pool.faults.attempts == {}  # innocent requests charged in the first crash were cleared
    _assert_router_empty(pool)


def test_failed_document_aborts_its_requests_in_flight(tiny_model_dir, tmp_path):
    config = _config(tiny_model_dir)
    docs = _docs()
    key = _key(config, docs[2])
    bad = f"{key}/map/0"
    aborted = []

    def hook(engine):
        add, abort = engine.add_request, engine.abort

        def add_request(request_id, *args, **kw):
            if request_id == bad:
                raise ValueError("unservable request")  # fails alone, at once
            return add(request_id, *args, **kw)

        def record_abort(request_id):
            aborted.append(request_id)
            return abort(request_id)

        engine.add_request, engine.abort = add_request, record_abort

    pool = LocalPool(dataclasses.replace(engine_spec(config), engine_hook=hook))
    try:
        stats, rows = _run(config, docs, pool, tmp_path)
    finally:
        pool.close()
    assert rows["c"]["status"] == "error" and "unservable request" in rows["c"]["error"]
    assert all(rows[d]["status"] == "ok" for d in "abd"), stats.errors
    assert aborted and all(rid.startswith(key + "/map/") for rid in aborted), aborted
    assert pool.num_restarts == 0
    _assert_router_empty(pool)


def test_finished_documents_leave_the_router(tiny_model_dir, tmp_path):
    config = _config(tiny_model_dir)
    pool = LocalPool(engine_spec(config))
    try:
        stats, rows = _run(config, _docs(), pool, tmp_path)
    finally:
        pool.close()
    assert stats.num_failed == 0 and len(rows) == 4
    _assert_router_empty(pool)


def test_a_restart_that_never_comes_up_fails_clearly(tiny_model_dir):
    config = _config(tiny_model_dir)
    builds = []
    release = threading.Event()

    def hook(engine):
        builds.append(engine)
        if len(builds) == 1:
            def broken_step():
                raise RuntimeError("engine bug")
            engine.step = broken_step
        else:
            release.wait(30)  # the rebuilt engine hangs while loading

    pool = LocalPool(dataclasses.replace(engine_spec(config), engine_hook=hook),
                     restart_timeout_s=0.5)
    try:
        pool.submit([WorkRequest("x/map/0", [5] * 12, {"max_tokens": 2}, routing_key="x")])
        t0 = time.monotonic()
        with pytest.raises(ReplicaStartTimeout, match=r"replica 0 did not come up within 0.5 s.*restart_timeout_s"):
            for _ in range(20):
                pool.results(timeout=1.0)
        assert time.monotonic() - t0 < 10
    finally:
        release.set()
        pool.close()


def _req(rid):
    return WorkRequest(rid, [1, 2], {}, routing_key=rid.split("/")[0])


def test_blame_lands_on_the_request_that_fails_alone():
    faults = RequestFaults(1, max_attempts=3)
    reqs = [_req(f"d{i}/map/0") for i in range(3)]
    assert faults.to_send(0, reqs) == reqs  # nobody is suspect yet
    # Crash 1: all three held, all charged once; they come back one at a time (probation).
    retry, poisoned = faults.failed(0, reqs, "boom")
    assert retry == reqs and poisoned == []
    assert faults.to_send(0, retry) == [reqs[0]]
    assert faults.finished(0, "d0/map/0") == [reqs[1]]  # d0 was innocent: cleared, next probe
    held = reqs[1:]
    # Crash 2 while d1 is probed: only d1 is charged (d2 was queued, not sent).
    retry, poisoned = faults.failed(0, held, "boom")
    assert retry == [reqs[1]] and poisoned == []
    assert faults.attempts == {"d1/map/0": 2, "d2/map/0": 1}
    assert faults.to_send(0, retry) == [reqs[2]]
    assert faults.finished(0, "d2/map/0") == [reqs[1]]
    retry, poisoned = faults.failed(0, [reqs[1]], "boom")  # third strike
    assert retry == [] and [p.request_id for p in poisoned] == ["d1/map/0"]
    assert poisoned[0].error.startswith("poison request: boom")
    assert faults.attempts == {}
