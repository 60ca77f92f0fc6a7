"""Stores, outputs and job directories on S3: a real S3-compatible server (moto's server
mode) started on 127.0.0.1 by the tests, talked to by pyarrow's own S3 client over HTTP.

Run inside scripts/netns (as `make test` does) so nothing can leave loopback."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("moto.server")

from click.testing import CliRunner  # noqa: E402

from pipeline.fs import location  # noqa: E402
from pipeline.output import DocResult, ResultWriter, read_results  # noqa: E402
from pipeline.stores import StoreError, open_store  # noqa: E402

BUCKET = "docpipe-test"
ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION",
            "AWS_EC2_METADATA_DISABLED")


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on a free loopback port, with the AWS variables pointing at it for
    the session (and for subprocesses, which inherit them); stopped at the end."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in ENV_KEYS}
    os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1",
                      AWS_EC2_METADATA_DISABLED="true")
    import pyarrow.fs as pafs

    pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http",
                      allow_bucket_creation=True).create_dir(BUCKET)
    try:
        yield f"{host}:{port}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_prefix(s3_server, request):
    """A fresh prefix per test: s3://docpipe-test/<test name>-<time>."""
    name = request.node.name.replace("[", "-").replace("]", "")
    return f"s3://{BUCKET}/{name}-{time.monotonic_ns()}"


def put(uri: str, data: bytes) -> None:
    loc = location(uri)
    with loc.open_write() as f:
        f.write(data)


def keys(prefix: str) -> list[str]:
    root = location(prefix)
    return [p.relative_to(root).as_posix() for p in root.files()]


# -- stores -------------------------------------------------------------------------------


def test_text_prefix_from_bucket(s3_prefix):
    put(f"{s3_prefix}/docs/a.txt", b"Alpha text.")
    put(f"{s3_prefix}/docs/sub/b.md", b"Beta text.")
    put(f"{s3_prefix}/docs/skip.bin", b"\0")
    put(f"{s3_prefix}/docs/bad.txt", b"\xff\xfe")
    docs = list(open_store(f"{s3_prefix}/docs"))
    assert [d.doc_id for d in docs] == ["a.txt", "bad.txt", "sub/b.md"]
    assert docs[0].text == "Alpha text." and docs[0].source == f"{s3_prefix}/docs/a.txt"
    assert docs[1].error.startswith(f"{s3_prefix}/docs/bad.txt: invalid UTF-8")
    assert [d.doc_id for d in open_store(f"{s3_prefix}/docs", glob="sub/*")] == ["sub/b.md"]
    one = list(open_store(f"{s3_prefix}/docs/a.txt"))
    assert [(d.doc_id, d.text) for d in one] == [("a.txt", "Alpha text.")]


def test_jsonl_from_bucket(s3_prefix):
    lines = [json.dumps({"id": f"d{i}", "text": f"line {i} " * 50, "lang": "en"}) for i in range(3000)]
    put(f"{s3_prefix}/docs.jsonl", ("\n".join(lines) + "\n\nnot json\n").encode())
    docs = list(open_store(f"{s3_prefix}/docs.jsonl", columns=["lang"]))
    assert len(docs) == 3001
    assert docs[0].doc_id == "d0" and docs[0].metadata["lang"] == "en"
    assert docs[2999].text == "line 2999 " * 50
    assert docs[-1].error == f"{s3_prefix}/docs.jsonl#3002: not valid JSON (Expecting value at column 1)"


def test_parquet_dataset_from_bucket_in_record_batches(s3_prefix):
    for part in range(2):
        table = pa.table({"id": [f"p{part}-{i}" for i in range(300)],
                          "text": [f"row {i} of part {part}" for i in range(300)],
                          "score": [i / 300 for i in range(300)]})
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, row_group_size=100)
        put(f"{s3_prefix}/ds/part-{part}.parquet", buf.getvalue().to_pybytes())
    docs = list(open_store(f"{s3_prefix}/ds", batch_size=64, columns=["score"]))
    assert len(docs) == 600 and docs[301].doc_id == "p1-1"
    assert docs[301].source == f"{s3_prefix}/ds/part-1.parquet#1"
    assert docs[301].metadata["score"] == pytest.approx(1 / 300)
    with pytest.raises(StoreError, match="has no column 'body'"):
        open_store(f"{s3_prefix}/ds", text_column="body")


def test_missing_and_credential_uris_are_store_errors(s3_prefix):
    with pytest.raises(StoreError, match=f"input '{s3_prefix}/nope' does not exist"):
        open_store(f"{s3_prefix}/nope")
    with pytest.raises(StoreError, match="credentials do not belong in a URI") as info:
        open_store(f"s3://AKIA:secret@{BUCKET}/x.jsonl")
    assert "secret" not in str(info.value)


# -- outputs ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_writer_to_bucket_is_atomic(s3_prefix, fmt):
    out = f"{s3_prefix}/out.{fmt}"
    with ResultWriter(out, fmt, flush_rows=2) as w:
        for i in range(5):
            w.write(DocResult(doc_id=f"d{i}", source="s", summary=f"sum {i}"))
        # rows so far live in a hidden temporary object; nothing at `out` yet
        assert [k for k in keys(s3_prefix) if not k.startswith(".")] == []
    assert keys(s3_prefix) == [f"out.{fmt}"]
    assert [r["summary"] for r in read_results(out)] == [f"sum {i}" for i in range(5)]
    with pytest.raises(RuntimeError), ResultWriter(out, fmt) as w:
        w.write(DocResult(doc_id="x", source="s"))
        raise RuntimeError("boom")
    assert keys(s3_prefix) == [f"out.{fmt}"]  # the old output untouched, no temporary left
    assert len(read_results(out)) == 5


def test_cli_run_bucket_to_bucket(s3_prefix, tiny_model_dir):
    from jobs.cli import main

    for i in range(2):
        put(f"{s3_prefix}/in/doc{i}.txt", (f"Document {i}. " + "Calm seas. " * 60).encode())
    result = CliRunner().invoke(main, ["run", f"{s3_prefix}/in", "-o", f"{s3_prefix}/out.parquet",
                                       "--model", str(tiny_model_dir), "--no-ray", "--quiet",
                                       "--chunk-tokens", "128", "--overlap", "16",
                                       "--max-summary-tokens", "6", "--dtype", "float32"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = read_results(f"{s3_prefix}/out.parquet")
    assert [(r["doc_id"], r["status"]) for r in rows] == [("doc0.txt", "ok"), ("doc1.txt", "ok")]
    assert rows[0]["source"] == f"{s3_prefix}/in/doc0.txt"


# -- job output directories -----------------------------------------------------------------


def make_s3_job(tmp_path, model_dir, store: str, out: str):
    from jobs.spec import load_job
    from tests.jobfiles import tiny_job_text

    path = tmp_path / "job.toml"
    path.write_text(tiny_job_text(store, out, model_dir))
    return load_job(path)


def put_docs(prefix: str, sizes) -> None:
    for i, n in enumerate(sizes):
        put(f"{prefix}/doc{i}.txt", (f"Document {i}. " + "The sea was calm that night. " * n).encode())


def job_rows(out):
    from jobs.runner import read_dataset

    cols = ["doc_id", "status", "summary", "chunks", "config_fingerprint", "content_hash"]
    return sorted(read_dataset(out).select(cols).to_pylist(), key=lambda r: r["doc_id"])


@pytest.fixture
def job_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("DOCPIPE_JOB_CACHE", str(cache))
    return cache


def test_job_directory_in_bucket_is_incremental(s3_prefix, tiny_model_dir, tmp_path, job_cache):
    from jobs.runner import run_job
    from jobs.state import JobState

    put_docs(f"{s3_prefix}/in", [4, 8, 12])
    spec = make_s3_job(tmp_path, tiny_model_dir, f"{s3_prefix}/in", f"{s3_prefix}/out")
    assert spec.output_dir == f"{s3_prefix}/out"
    first = run_job(spec)
    assert (first.num_done, first.num_skipped) == (3, 0) and first.part.name == "part-00001.parquet"
    objects = keys(f"{s3_prefix}/out")
    assert "part-00001.parquet" in objects and "_ledger.jsonl" in objects
    assert not [k for k in objects if k.startswith(".")]  # nothing in progress is left
    assert any(k.startswith("_state/results/") for k in objects)
    # the state is rebuilt from the objects: a fresh cache directory changes nothing
    os.environ["DOCPIPE_JOB_CACHE"] = str(tmp_path / "other-machine")
    again = run_job(spec)
    assert (again.num_done, again.num_skipped, again.num_requests) == (0, 3, 0)
    put(f"{s3_prefix}/in/doc1.txt", b"Changed. " * 40)
    third = run_job(spec)
    assert (third.num_done, third.num_skipped) == (1, 2)
    rows = job_rows(spec.output_dir)
    assert [r["doc_id"] for r in rows] == ["doc0.txt", "doc1.txt", "doc2.txt"]  # once each
    ledger = JobState(spec.output_dir).ledger()
    assert [(r["status"], r["num_done"]) for r in ledger] == [("ok", 3), ("ok", 0), ("ok", 1)]
    table = pq.read_table(f"{BUCKET}/{s3_prefix.split('/', 3)[3]}/out",
                          filesystem=location(s3_prefix).fs)  # the bucket prefix as a dataset
    assert table.num_rows == 3  # _requests/, _state/ and _ledger.jsonl are not rows
    from pipeline.report import write_report

    report = write_report(spec.output_dir)
    assert report.uri == f"{s3_prefix}/out/_report.html"
    page = report.read_bytes().decode()
    assert page.count('class="tree"') == 3 and page.count("data:image/png;base64,") >= 6
    assert {"_requests/run-00001.arrow", "_requests/run-00003.arrow"} <= set(keys(f"{s3_prefix}/out"))


KILL_SCRIPT = """
import os, signal, sys
from jobs.runner import run_job
from jobs.spec import load_job
import jobs.remote_state as remote

limit = int(sys.argv[2])
orig = remote.RemoteJobState.flush_results
flushed = 0
def flush_then_maybe_die(self):
    global flushed
    had = len(self._buffer)
    orig(self)
    flushed += had
    if flushed >= limit:
        os.kill(os.getpid(), signal.SIGKILL)
remote.RemoteJobState.flush_results = flush_then_maybe_die
remote.FLUSH_RESULTS = 4
run_job(load_job(sys.argv[1]))
"""


def test_killed_job_in_bucket_resumes_from_its_objects(s3_prefix, tiny_model_dir, tmp_path, job_cache):
    from jobs.runner import run_job
    from jobs.state import JobState

    put_docs(f"{s3_prefix}/in", [20, 35, 50])
    (tmp_path / "ref").mkdir()
    ref = make_s3_job(tmp_path / "ref", tiny_model_dir, f"{s3_prefix}/in", f"{s3_prefix}/ref")
    run_job(ref)
    expected = job_rows(ref.output_dir)

    (tmp_path / "killed").mkdir()
    spec = make_s3_job(tmp_path / "killed", tiny_model_dir, f"{s3_prefix}/in", f"{s3_prefix}/out")
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(spec.source), "6"],
                          cwd=os.getcwd(), capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not [k for k in keys(f"{s3_prefix}/out") if k.startswith("part-")]  # nothing published
    stored = JobState(spec.output_dir).num_results()
    assert stored >= 6
    resumed = run_job(spec)
    assert resumed.num_cached_requests >= 6  # finished work was not redone
    assert job_rows(spec.output_dir) == expected
    assert [r["status"] for r in JobState(spec.output_dir).ledger()] == ["killed", "ok"]
    assert not [k for k in keys(f"{s3_prefix}/out") if k.startswith(".")]


def test_publish_killed_half_way_is_finished_by_the_next_run(s3_prefix, tiny_model_dir, tmp_path,
                                                              job_cache, monkeypatch):
    import jobs.remote_state as remote
    from jobs.runner import run_job
    from jobs.state import JobState

    put_docs(f"{s3_prefix}/in", [4, 8, 12])
    spec = make_s3_job(tmp_path, tiny_model_dir, f"{s3_prefix}/in", f"{s3_prefix}/out")
    run_job(spec)
    put(f"{s3_prefix}/in/doc1.txt", b"Changed. " * 40)

    def die(self, tmp, part):  # the old part is rewritten; the new one never moved in
        raise KeyboardInterrupt("killed mid-publish")

    monkeypatch.setattr(remote.RemoteJobState, "_move", die)
    with pytest.raises(KeyboardInterrupt):
        run_job(spec)
    monkeypatch.undo()
    objects = keys(f"{s3_prefix}/out")
    assert "_state/publish-00002.json" in objects and ".part-00002.parquet.inprogress" in objects
    # a reader now sees doc1 nowhere (its old row dropped, its new one not in yet), never twice
    assert [r["doc_id"] for r in job_rows(spec.output_dir)] == ["doc0.txt", "doc2.txt"]
    third = run_job(spec)  # recover() finishes the publish first: nothing left to do
    assert (third.num_done, third.num_skipped) == (0, 3)
    rows = job_rows(spec.output_dir)
    assert [r["doc_id"] for r in rows] == ["doc0.txt", "doc1.txt", "doc2.txt"]
    objects = keys(f"{s3_prefix}/out")
    assert "part-00002.parquet" in objects and not [k for k in objects if k.startswith(".")]
    assert not [k for k in objects if k.startswith("_state/publish-")]
    assert [r["status"] for r in JobState(spec.output_dir).ledger()] == ["ok", "killed", "ok"]


# -- a lock across machines ----------------------------------------------------------------


def _lock_key(prefix: str) -> tuple[str, str]:
    bucket, key = prefix[len("s3://"):].split("/", 1)
    return bucket, f"{key}/out/_state/lock.json"


def foreign_lease(prefix: str, host: str = "other-machine", pid: int = 4242) -> None:
    """What a run on another machine leaves: its lease object, just renewed."""
    bucket, key = _lock_key(prefix)
    body = json.dumps(dict(owner=f"{host}-{pid}", host=host, pid=pid, ttl_s=120.0, run="")).encode()
    from jobs.remote_lock import _client

    _client().put_object(Bucket=bucket, Key=key, Body=body)


def test_lease_keeps_a_second_machine_out_and_a_stale_one_is_taken_over(s3_prefix):
    from jobs.remote_lock import LeaseHeld, LeaseLost, S3Lease

    out = f"{s3_prefix}/out"
    first = S3Lease(out, ttl_s=1.0)
    first.body = json.dumps(dict(owner="a", host="machine-a", pid=1, ttl_s=1.0)).encode()
    first.acquire()
    first._stop.set()  # as if machine-a died: no more renewals
    with pytest.raises(LeaseHeld, match="in progress on machine-a"):
        S3Lease(out, ttl_s=1.0).acquire()  # the lease is fresh
    time.sleep(2.5)  # Last-Modified has 1 s resolution: the lease is now older than its ttl
    taker = S3Lease(out, ttl_s=30.0)
    taker.acquire()
    with pytest.raises(LeaseLost):
        first.renew()
    with pytest.raises(LeaseLost):
        first.check()
    taker.release()
    assert "_state/lock.json" not in keys(out)
    again = S3Lease(out)
    again.acquire()
    again.release()


def test_job_in_bucket_refuses_to_run_beside_another_machines_run(s3_prefix, tiny_model_dir,
                                                                  tmp_path, job_cache):
    from jobs.runner import JobLocked, run_job

    put_docs(f"{s3_prefix}/in", [4])
    spec = make_s3_job(tmp_path, tiny_model_dir, f"{s3_prefix}/in", f"{s3_prefix}/out")
    foreign_lease(s3_prefix)
    with pytest.raises(JobLocked, match="other-machine"):
        run_job(spec)
    assert not [k for k in keys(f"{s3_prefix}/out") if k.startswith("part-")]
    # a lease left by a killed run of this machine does not make the resume wait
    foreign_lease(s3_prefix, host=__import__("socket").gethostname(), pid=2 ** 22 + 1)
    assert run_job(spec).num_done == 1
    assert "_state/lock.json" not in keys(f"{s3_prefix}/out")  # released at the end


def test_job_that_loses_its_lease_does_not_publish(s3_prefix, tiny_model_dir, tmp_path, job_cache,
                                                   monkeypatch):
    import jobs.remote_lock as remote_lock
    from jobs.runner import run_job
    from jobs.state import JobState

    monkeypatch.setattr(remote_lock, "DEFAULT_TTL_S", 0.6)  # renewals every 0.2 s
    put_docs(f"{s3_prefix}/in", [4, 8])
    spec = make_s3_job(tmp_path, tiny_model_dir, f"{s3_prefix}/in", f"{s3_prefix}/out")
    seen = []

    def on_progress(*args, **kwargs):  # another machine takes the lease mid-run
        if not seen:
            seen.append(1)
            foreign_lease(s3_prefix)
            time.sleep(0.8)

    with pytest.raises(remote_lock.LeaseLost):
        run_job(spec, on_progress=on_progress)
    assert seen
    assert not [k for k in keys(f"{s3_prefix}/out") if k.startswith("part-")]
    assert [r["status"] for r in JobState(spec.output_dir).ledger()] == ["failed"]


def test_schedule_of_a_job_in_bucket_keeps_its_ticks_there(s3_prefix, tiny_model_dir, tmp_path,
                                                          job_cache):
    from jobs.schedule import run_schedule
    from jobs.state import JobState

    put_docs(f"{s3_prefix}/in", [4])
    path = tmp_path / "job.toml"
    from tests.jobfiles import tiny_job_text

    path.write_text(tiny_job_text(f"{s3_prefix}/in", f"{s3_prefix}/out", tiny_model_dir)
                    + '\n[schedule]\ncron = "*/5 * * * *"\n')
    from jobs.spec import load_job

    spec = load_job(path)
    clock = [1_800_000_000.0]  # a tick every 300 s

    def sleep(s):
        clock[0] += s

    results = run_schedule(spec, max_runs=2, clock=lambda: clock[0], sleep=sleep)
    assert [r.num_done for r in results] == [1, 0]
    assert "_state/schedule.json" in keys(f"{s3_prefix}/out")
    os.environ["DOCPIPE_JOB_CACHE"] = str(tmp_path / "other-machine")  # ticks come from objects
    assert JobState(spec.output_dir).last_tick(spec.name) == clock[0]
