"""Replica failures charged to requests: retry the innocent, give up on a poison request.

A replica fails when its process dies or its engine thread raises. The requests it held are
retried on the restarted replica; each request counts the failures it was blamed for, and at
`max_attempts` it comes back as an error result (`poison request: <cause>`), so its document
becomes an error row while the others go on. The budget is per request, not per run.

Who is blamed (a step runs many requests together, so a crash does not name its culprit):

    failure with no suspect in flight   -> every request it held is charged once (a suspect)
    failure with a suspect in flight    -> only the suspect is charged
    suspects run one at a time per replica, beside the unsuspected traffic

So a request that crashes its replica alone is charged on every try, and an innocent request
caught in the first crash is charged once, then cleared when it finishes on probation.
"""

from __future__ import annotations

from collections import deque

from workers.host import WorkRequest, WorkResult

MAX_ATTEMPTS = 3


class RequestFaults:
    """Attempts per request id and the probation queue (suspects) of each replica.

    Rules: a request id is in `attempts` only while charged and unfinished; a replica runs at
    most one suspect at a time (`probing`); a queued suspect was not sent, so a failure of its
    replica does not charge it."""

    def __init__(self, num_replicas: int, max_attempts: int = MAX_ATTEMPTS) -> None:
        assert max_attempts >= 1
        self.max_attempts = max_attempts
        self.attempts: dict[str, int] = {}
        self.probation: list[deque[WorkRequest]] = [deque() for _ in range(num_replicas)]
        self.probing: list[str | None] = [None] * num_replicas

    def is_queued(self, replica: int, request_id: str) -> bool:
        return any(r.request_id == request_id for r in self.probation[replica])

    def to_send(self, replica: int, requests: list[WorkRequest]) -> list[WorkRequest]:
        """Of `requests` bound for `replica`, those to send now (suspects wait their turn)."""
        now = []
        for r in requests:
            if self.attempts.get(r.request_id):
                self.probation[replica].append(r)
            else:
                now.append(r)
        return now + self._next_probe(replica)

    def _next_probe(self, replica: int) -> list[WorkRequest]:
        if self.probing[replica] is None and self.probation[replica]:
            r = self.probation[replica].popleft()
            self.probing[replica] = r.request_id
            return [r]
        return []

    def finished(self, replica: int, request_id: str) -> list[WorkRequest]:
        """A request came back (or was aborted); returns the next suspect to send, if any."""
        self.attempts.pop(request_id, None)
        if self.probing[replica] == request_id:
            self.probing[replica] = None
        return self._next_probe(replica)

    def forget(self, replica: int, request_ids: set[str]) -> list[WorkRequest]:
        """Aborted requests: drop them from the queue and the counts."""
        q = self.probation[replica]
        self.probation[replica] = deque(r for r in q if r.request_id not in request_ids)
        nxt: list[WorkRequest] = []
        for rid in request_ids:
            nxt += self.finished(replica, rid)
        return nxt

    def failed(self, replica: int, held: list[WorkRequest], cause: str
               ) -> tuple[list[WorkRequest], list[WorkResult]]:
        """`replica` failed holding `held` (everything routed to it and unfinished). Charges
        the blamed requests; returns (to resubmit, poison results). Queued suspects stay
        queued and are in neither list."""
        sent = [r for r in held if not self.is_queued(replica, r.request_id)]
        probe = self.probing[replica]
        self.probing[replica] = None
        if probe is not None and any(r.request_id == probe for r in sent):
            blamed = {probe}
        else:
            blamed = {r.request_id for r in sent}
        retry, poisoned = [], []
        for r in sent:
            n = self.attempts.get(r.request_id, 0) + (r.request_id in blamed)
            if n >= self.max_attempts:
                self.attempts.pop(r.request_id, None)
                poisoned.append(WorkResult(
                    r.request_id, replica=replica,
                    error=f"poison request: {cause} (its replica failed {n} times with it)"))
            else:
                if n:
                    self.attempts[r.request_id] = n
                retry.append(r)
        return retry, poisoned
