"""A model pool that answers instantly, for tests about inputs, streaming and bookkeeping
(not about the model): each request's output names the request and its prompt length."""

from __future__ import annotations

from workers.host import WorkResult


class EchoPool:
    num_replicas = 1
    num_restarts = 0

    def __init__(self) -> None:
        self._done: list[WorkResult] = []
        self.num_requests = 0
        self.max_inflight = 0
        self.key_to_replica: dict[str, int] = {}

    @property
    def num_inflight(self) -> int:
        return len(self._done)

    def submit(self, requests) -> None:
        for r in requests:
            self.num_requests += 1
            self._done.append(WorkResult(
                r.request_id, text=f"[{r.request_id.split('/', 1)[1]}: {len(r.prompt_token_ids)} tokens]",
                token_ids=[1, 2, 3], finish_reason="length",
                num_prompt_tokens=len(r.prompt_token_ids), num_generated_tokens=3, replica=0,
            ))
        self.max_inflight = max(self.max_inflight, len(self._done))

    def results(self, timeout: float = 1.0) -> list[WorkResult]:
        done, self._done = self._done, []
        return done

    def stats(self) -> list[dict]:
        return []

    def close(self) -> None:
        pass
