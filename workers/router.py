"""Document-affinity routing: a document's requests go to one replica (its prefix cache),
and new documents go to the replica with the fewest outstanding tokens."""

from __future__ import annotations


class Router:
    def __init__(self, num_replicas: int) -> None:
        assert num_replicas > 0
        self.num_replicas = num_replicas
        self.key_to_replica: dict[str, int] = {}
        self.outstanding_tokens = [0] * num_replicas
        self.key_requests: dict[str, int] = {}  # in-flight requests per routing key

    def route(self, key: str, num_tokens: int) -> int:
        replica = self.key_to_replica.get(key)
        if replica is None:
            replica = min(range(self.num_replicas), key=self.outstanding_tokens.__getitem__)
            self.key_to_replica[key] = replica
        self.outstanding_tokens[replica] += num_tokens
        self.key_requests[key] = self.key_requests.get(key, 0) + 1
        return replica

    def complete(self, key: str, replica: int, num_tokens: int) -> None:
        self.outstanding_tokens[replica] -= num_tokens
        assert self.outstanding_tokens[replica] >= 0, "completed more tokens than routed"
        self.key_requests[key] -= 1

    def release(self, key: str) -> None:
        """Forget a finished document (its later requests, if any, may go anywhere)."""
        if self.key_requests.get(key, 0) == 0:
            self.key_to_replica.pop(key, None)
            self.key_requests.pop(key, None)

    def reassign(self, replica: int) -> None:
        """A replica was replaced: its outstanding work is gone (it is resubmitted)."""
        self.outstanding_tokens[replica] = 0
