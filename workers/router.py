"""Which replica of its pool serves a request.

A request with an affinity key goes where that key first went (its prompt shares a prefix
with the key's earlier requests, which that replica's prefix cache holds); a request without
one, and a key's first request, goes to the pool's replica with the fewest outstanding
tokens. Keys are "GROUP" or "GROUP#SUB" (a document, or one chunk of it): `release(GROUP)`
forgets all of a group's keys when its document is done, so the maps stay bounded.
"""

from __future__ import annotations

from collections.abc import Sequence


class Router:
    def __init__(self, num_replicas: int, replica_pools: Sequence[str] | None = None) -> None:
        assert num_replicas > 0
        self.num_replicas = num_replicas
        pools = list(replica_pools) if replica_pools is not None else [""] * num_replicas
        assert len(pools) == num_replicas, "one pool name per replica"
        self.pool_to_replicas: dict[str, list[int]] = {}
        for i, name in enumerate(pools):
            self.pool_to_replicas.setdefault(name, []).append(i)
        self.default_pool = pools[0]
        self.key_to_replica: dict[str, int] = {}
        self.outstanding_tokens = [0] * num_replicas
        self.key_requests: dict[str, int] = {}  # in-flight requests per affinity key
        self.group_to_keys: dict[str, set[str]] = {}

    def replicas_of(self, pool: str) -> list[int]:
        replicas = self.pool_to_replicas.get(pool or self.default_pool)
        assert replicas is not None, f"unknown pool {pool!r}: the runner routed to a pool the pool set lacks"
        return replicas

    def route(self, key: str, num_tokens: int, pool: str = "") -> int:
        replicas = self.replicas_of(pool)
        replica = self.key_to_replica.get(key) if key else None
        if replica is None or replica not in replicas:
            replica = min(replicas, key=self.outstanding_tokens.__getitem__)
            if key:
                self.key_to_replica[key] = replica
                self.group_to_keys.setdefault(key.split("#", 1)[0], set()).add(key)
        self.outstanding_tokens[replica] += num_tokens
        if key:
            self.key_requests[key] = self.key_requests.get(key, 0) + 1
        return replica

    def complete(self, key: str, replica: int, num_tokens: int) -> None:
        self.outstanding_tokens[replica] -= num_tokens
        assert self.outstanding_tokens[replica] >= 0, "completed more tokens than routed"
        if key:
            self.key_requests[key] -= 1

    def release(self, group: str) -> None:
        """Forget a finished document's keys (its later requests, if any, may go anywhere)."""
        keys = self.group_to_keys.pop(group, set()) | ({group} if group in self.key_to_replica else set())
        kept = set()
        for key in keys:
            if self.key_requests.get(key, 0) == 0:
                self.key_to_replica.pop(key, None)
                self.key_requests.pop(key, None)
            else:
                kept.add(key)
        if kept:
            self.group_to_keys[group] = kept

    def reassign(self, replica: int) -> None:
        """A replica was replaced: its outstanding work is gone (it is resubmitted)."""
        self.outstanding_tokens[replica] = 0
