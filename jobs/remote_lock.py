"""A job's lock when its output directory is on S3: a lease object that any machine respects.

Object stores have no advisory locks, but S3 (and S3-compatible servers such as MinIO and
moto) has conditional writes, which are enough for a lease:

    s3://bucket/jobs/nightly/_state/lock.json   {"owner", "host", "pid", "ttl_s", "run"}

- **Take:** `PutObject` with `If-None-Match: *` creates the object only if there is none. Of
  two machines racing, exactly one succeeds; the other gets 412 and reads the holder.
- **Expire:** the holder renews the lease every `ttl_s / 3` seconds (`PutObject` with
  `If-Match: <its ETag>`), so a lease whose object was last modified more than `ttl_s` ago
  belongs to a dead run (a killed machine renews nothing). Age is measured on the server's
  clock only (the object's `Last-Modified` against the `Date` of the response that read it),
  so clocks that differ between machines do not matter.
- **Take over** a stale lease with `If-Match: <the stale ETag>`: if two machines both find it
  stale, one replaces it and the other's write fails. A lease left by a process of this
  machine that is gone (a killed run, resumed at once) is stale at once: the job's local flock,
  held while the lease is taken, proves no live run here holds it.
- **Lose:** a renewal that fails with 412 means another machine took the lease (this run was
  stalled for longer than `ttl_s`); `lost` is set and `check()` raises, and the runner checks
  before it publishes, so a run that lost its lease never commits a part.
- **Release:** delete the object if its ETag is still ours.

boto3 does the requests (endpoint, region and credentials from the environment, as
pyarrow's S3 client reads them: `AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`...).
Other schemes (gs://, hdfs://), or S3 without boto3 installed, fall back to the local `flock`
of jobs.runner.job_lock, which keeps runs on one machine apart only, and say so once.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from datetime import datetime
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

from pipeline.fs import unique_token

logger = logging.getLogger(__name__)

LOCK_KEY = "_state/lock.json"
DEFAULT_TTL_S = 120.0


class LeaseHeld(RuntimeError):
    """Another machine (or process) holds the job's lease."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over: it must not publish."""


def supports_lease(uri: str) -> bool:
    """Whether `uri` gets a cross-machine lease (s3:// with boto3 importable)."""
    if urlsplit(uri).scheme.lower() not in ("s3", "s3a"):
        return False
    try:
        import boto3  # noqa: F401
    except ImportError:
        return False
    return True


def _client():
    import boto3

    return boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None,
                        region_name=os.environ.get("AWS_REGION")
                        or os.environ.get("AWS_DEFAULT_REGION") or None)


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", "")) or str(
        response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


def _precondition_failed(exc: Exception) -> bool:
    return _code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


class S3Lease:
    """The lease on one job directory (module docstring). Use as a context manager."""

    def __init__(self, uri: str, *, ttl_s: float | None = None, run: str = "",
                 client=None) -> None:
        parts = urlsplit(uri.rstrip("/"))
        self.uri = uri.rstrip("/")
        self.bucket = parts.netloc
        self.key = "/".join(p for p in (parts.path.strip("/"), LOCK_KEY) if p)
        self.ttl_s = float(ttl_s or DEFAULT_TTL_S)
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{unique_token()}"
        self.body = json.dumps(dict(owner=self.owner, host=socket.gethostname(),
                                    pid=os.getpid(), ttl_s=self.ttl_s, run=run)).encode()
        self.s3 = client or _client()
        self.etag: str | None = None
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    # -- taking and giving back --------------------------------------------------------------
    def acquire(self) -> None:
        if not self._create():
            self._take_over_if_stale()
        self._renewer = threading.Thread(target=self._renew_loop, daemon=True,
                                         name=f"lease {self.uri}")
        self._renewer.start()

    def _create(self) -> bool:
        """Write the lease if there is none (If-None-Match: *); False if there is one."""
        try:
            self.etag = self.s3.put_object(Bucket=self.bucket, Key=self.key, Body=self.body,
                                           IfNoneMatch="*")["ETag"]
        except Exception as exc:
            if _precondition_failed(exc):
                return False
            raise
        return True

    def _take_over_if_stale(self) -> None:
        try:
            got = self.s3.get_object(Bucket=self.bucket, Key=self.key)
        except Exception as exc:
            if _code(exc) in ("NoSuchKey", "404"):  # released between our put and get
                if self._create():
                    return
                raise LeaseHeld(f"{self.uri}: another run of this job is in progress") from None
            raise
        holder = _read_json(got["Body"].read())
        age = _server_age_s(got)
        if age <= float(holder.get("ttl_s") or self.ttl_s) and not _dead_here(holder):
            raise LeaseHeld(
                f"{self.uri}: another run of this job is in progress on "
                f"{holder.get('host', '?')} (pid {holder.get('pid', '?')}, lease renewed "
                f"{age:.0f} s ago); wait for it, or, if that machine is gone, for its lease to "
                f"expire ({float(holder.get('ttl_s') or self.ttl_s):.0f} s after its last "
                f"renewal)")
        logger.warning("%s: taking over the lease of %s (pid %s), not renewed for %.0f s",
                       self.uri, holder.get("host", "?"), holder.get("pid", "?"), age)
        try:
            self.etag = self.s3.put_object(Bucket=self.bucket, Key=self.key, Body=self.body,
                                           IfMatch=got["ETag"])["ETag"]
        except Exception as exc:
            if _precondition_failed(exc):
                raise LeaseHeld(f"{self.uri}: another run took over the stale lease first") from None
            raise

    def renew(self) -> None:
        """Rewrite the lease if it is still ours (sets `lost` and raises when it is not)."""
        try:
            self.etag = self.s3.put_object(Bucket=self.bucket, Key=self.key, Body=self.body,
                                           IfMatch=self.etag)["ETag"]
        except Exception as exc:
            if _precondition_failed(exc) or _code(exc) in ("NoSuchKey", "404"):
                self.lost.set()
                raise LeaseLost(f"{self.uri}: this run's lease was taken over by another run "
                                f"(it did not renew for over {self.ttl_s:.0f} s)") from None
            raise

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except LeaseLost as exc:
                logger.error("%s", exc)
                return
            except Exception as exc:  # a network blip: try again at the next interval
                logger.warning("%s: renewing the lease failed (%s); retrying", self.uri, exc)

    def check(self) -> None:
        """Raise LeaseLost if another run took the lease (call before committing work)."""
        if self.lost.is_set():
            raise LeaseLost(f"{self.uri}: this run's lease was taken over by another run; "
                            f"nothing was published")

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=5)
        if self.etag is None or self.lost.is_set():
            return
        try:
            head = self.s3.head_object(Bucket=self.bucket, Key=self.key)
            if head.get("ETag") == self.etag:
                self.s3.delete_object(Bucket=self.bucket, Key=self.key)
        except Exception as exc:  # the lease then expires by itself
            logger.warning("%s: could not release the lease (%s); it expires in %.0f s",
                           self.uri, exc, self.ttl_s)

    def __enter__(self) -> S3Lease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _dead_here(holder: dict) -> bool:
    """Whether the holder was a process of this machine that is gone (a killed run resumed
    at once: no need to wait for its lease to expire). Called with the job's local flock
    held, so no live run here holds the lease either way."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return holder["pid"] == os.getpid()  # this very process, an earlier lease never released


def _read_json(data: bytes) -> dict:
    try:
        value = json.loads(data)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _server_age_s(response: dict) -> float:
    """Seconds since the object was last written, on the server's clock."""
    modified: datetime = response["LastModified"]
    date = (response.get("ResponseMetadata", {}).get("HTTPHeaders", {}) or {}).get("date")
    now = parsedate_to_datetime(date) if date else None
    if now is None:  # no Date header: the local clock (skew then counts)
        return time.time() - modified.timestamp()
    return (now - modified).total_seconds()
