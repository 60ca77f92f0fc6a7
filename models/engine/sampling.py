"""Sampling parameters, per-request sampling state, and the batched sampler.

Order of logits processing (as in vLLM): min_tokens mask -> repetition, frequency and presence
penalties -> greedy argmax, or temperature -> top-k -> top-p -> min-p -> sample.

Sampling inverts the cumulative distribution: one uniform draw `u` per row picks the first token
whose cumulative probability exceeds `u * total` (token i with probability probs[i]; a token
of probability 0 is never picked). One draw per row instead of one exponential per vocabulary
entry (the exponential race) makes the draw 3x cheaper on CPU (measured for 32 rows of a 49K
vocabulary: 42 ms -> 14 ms per step). Each seeded row draws its `u` from its own generator, so
a request's tokens depend only on its seed and logits, never on the batch around it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_SAMPLING_EPS = 1e-5  # temperatures below this are greedy (vLLM)


@dataclass(slots=True)
class SamplingParams:
    """Per-request sampling settings; names, defaults and semantics follow vLLM."""

    n: int = 1
    max_tokens: int | None = 16  # None: until the context is full
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many are generated
    temperature: float = 1.0  # below 1e-5: greedy
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # over prompt + output: positive logits / r, negative * r
    # False: repetition_penalty over the output tokens only (not vLLM's: a summary or an
    # extraction should be free to repeat the source's words, and only loops are penalized)
    penalize_prompt: bool = True
    presence_penalty: float = 0.0  # over output tokens: logit -= p if the token occurred
    frequency_penalty: float = 0.0  # over output tokens: logit -= f * count
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None  # only None or 0

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        if self.n != 1:
            raise ValueError(f"n={self.n!r}: only n=1 is supported; submit copies of the request")
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature!r}: must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r}: must be in (0, 1]")
        if self.top_k < -1:
            raise ValueError(f"top_k={self.top_k!r}: must be >= 1, or 0 / -1 to disable")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p={self.min_p!r}: must be in [0, 1]")
        if not self.repetition_penalty > 0:
            raise ValueError(
                f"repetition_penalty={self.repetition_penalty!r}: must be > 0 (1 is off)")
        if not -2 <= self.presence_penalty <= 2:
            raise ValueError(f"presence_penalty={self.presence_penalty!r}: must be in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            raise ValueError(f"frequency_penalty={self.frequency_penalty!r}: must be in [-2, 2]")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r}: must be >= 1, or None")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens={self.min_tokens!r}: must be >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens={self.min_tokens!r}: must be <= max_tokens={self.max_tokens!r}")
        if any(not s for s in self.stop):
            raise ValueError(f"stop={self.stop!r}: stop strings must be non-empty")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids={self.stop_token_ids!r}: ids must be >= 0")
        if self.logprobs is not None and self.logprobs != 0:
            raise ValueError(f"logprobs={self.logprobs!r}: only None or 0 is supported")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _SAMPLING_EPS

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


class SamplingState:
    """One request's sampling state, created when the request is added.

    Penalty counts are kept incrementally: `append` buffers the token id, and the next
    `Sampler` call adds the buffered ids into `output_counts` [V] (int32) on the logits'
    device. `prompt_mask` [V] (bool) is built once. Both exist only for requests with
    penalties. The seeded generator lives on the device of the first logits it samples from
    unless `device` is given.
    """

    __slots__ = ("params", "prompt_token_ids", "generator", "num_output_tokens",
                 "output_counts", "prompt_mask", "_pending_token_ids")

    def __init__(self, params: SamplingParams, prompt_token_ids: list[int],
                 device: torch.device | str | None = None) -> None:
        self.params = params
        self.prompt_token_ids = prompt_token_ids
        self.generator: torch.Generator | None = None
        if params.seed is not None and device is not None:
            self.generator = torch.Generator(device=device).manual_seed(params.seed)
        self.num_output_tokens = 0
        self.output_counts: torch.Tensor | None = None
        self.prompt_mask: torch.Tensor | None = None
        self._pending_token_ids: list[int] = []

    @property
    def is_seeded(self) -> bool:
        return self.params.seed is not None

    def append(self, token_id: int) -> None:
        """Record a generated token."""
        self.num_output_tokens += 1
        if self.params.has_penalties:
            self._pending_token_ids.append(token_id)

    def min_tokens_mask_ids(self, eos_token_ids: frozenset[int]) -> list[int]:
        """Token ids to mask this step: EOS (unless ignore_eos) and stop_token_ids while
        fewer than min_tokens have been generated."""
        p = self.params
        if self.num_output_tokens >= p.min_tokens:
            return []
        ids = list(p.stop_token_ids)
        if not p.ignore_eos:
            ids.extend(eos_token_ids)
        return ids

    def get_generator(self, device: torch.device) -> torch.Generator | None:
        if self.params.seed is not None and self.generator is None:
            self.generator = torch.Generator(device=device).manual_seed(self.params.seed)
        return self.generator

    def penalty_tensors(self, vocab_size: int,
                        device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(output_counts [V] int32, prompt_mask [V] bool), with buffered tokens added."""
        assert self.params.has_penalties, "penalty tensors requested for a request without penalties"
        if self.output_counts is None:
            self.output_counts = torch.zeros(vocab_size, dtype=torch.int32, device=device)
            self.prompt_mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            if self.prompt_token_ids and self.params.penalize_prompt:
                ids = torch.tensor(self.prompt_token_ids, dtype=torch.long, device=device)
                self.prompt_mask[ids] = True
        elif self.output_counts.device != device:
            self.output_counts = self.output_counts.to(device)
            self.prompt_mask = self.prompt_mask.to(device)
        assert self.output_counts.numel() == vocab_size, "vocab size changed between steps"
        pending = self._pending_token_ids
        if len(pending) == 1:
            self.output_counts[pending[0]] += 1
        elif pending:
            ids = torch.tensor(pending, dtype=torch.long, device=device)
            ones = torch.ones(len(pending), dtype=torch.int32, device=device)
            self.output_counts.index_put_((ids,), ones, accumulate=True)
        pending.clear()
        return self.output_counts, self.prompt_mask


class Sampler:
    """Samples one token per row of [B, V] logits. Stateless: all state is in the
    `SamplingState`s. Work is vectorised over rows; only seeded rows draw their noise
    row by row."""

    __slots__ = ()

    def __call__(self, logits: torch.Tensor, states: list[SamplingState],
                 eos_token_ids: frozenset[int] = frozenset()) -> list[int]:
        assert logits.dim() == 2 and logits.shape[0] == len(states), (
            f"logits {tuple(logits.shape)} must be [B, V] with one row per state ({len(states)})")
        if not states:
            return []
        device = logits.device
        all_greedy = all(s.params.is_greedy for s in states)
        needs_processing = any(s.params.has_penalties or s.num_output_tokens < s.params.min_tokens
                               for s in states)
        if all_greedy and not needs_processing:
            return logits.argmax(dim=-1).tolist()
        x = self.apply_penalties(logits, states, eos_token_ids)
        if all_greedy:
            return x.argmax(dim=-1).tolist()
        greedy_rows = [i for i, s in enumerate(states) if s.params.is_greedy]
        random_rows = [i for i, s in enumerate(states) if not s.params.is_greedy]
        random_states = [states[i] for i in random_rows]
        if greedy_rows:
            rows = torch.tensor(random_rows, dtype=torch.long, device=device)
            probs = self.compute_probs(x[rows], [s.params for s in random_states])
        else:
            probs = self.compute_probs(x, [s.params for s in random_states])
        sampled = self._inverse_cdf(probs, random_states)
        if not greedy_rows:
            return sampled.tolist()
        out = torch.empty(len(states), dtype=torch.long, device=device)
        out[rows] = sampled
        g_rows = torch.tensor(greedy_rows, dtype=torch.long, device=device)
        out[g_rows] = x[g_rows].argmax(dim=-1)
        return out.tolist()

    def apply_penalties(self, logits: torch.Tensor, states: list[SamplingState],
                        eos_token_ids: frozenset[int] = frozenset()) -> torch.Tensor:
        """Returns a float32 copy of logits [B, V] with the min_tokens mask and the
        repetition, frequency and presence penalties applied."""
        x = logits.to(torch.float32, copy=True)
        num_rows, vocab_size = x.shape
        device = x.device
        mask_rows: list[int] = []
        mask_ids: list[int] = []
        for i, s in enumerate(states):
            ids = [t for t in s.min_tokens_mask_ids(eos_token_ids) if t < vocab_size]
            mask_rows.extend([i] * len(ids))
            mask_ids.extend(ids)
        if mask_ids:
            r = torch.tensor(mask_rows, dtype=torch.long, device=device)
            c = torch.tensor(mask_ids, dtype=torch.long, device=device)
            x[r, c] = float("-inf")
        pen_rows = [i for i, s in enumerate(states) if s.params.has_penalties]
        if not pen_rows:
            return x
        tensors = [states[i].penalty_tensors(vocab_size, device) for i in pen_rows]
        counts = torch.stack([t[0] for t in tensors])  # [P, V]
        prompt_mask = torch.stack([t[1] for t in tensors])  # [P, V]
        params = [states[i].params for i in pen_rows]
        rep = torch.tensor([p.repetition_penalty for p in params], device=device).unsqueeze(1)
        freq = torch.tensor([p.frequency_penalty for p in params], device=device).unsqueeze(1)
        pres = torch.tensor([p.presence_penalty for p in params], device=device).unsqueeze(1)
        rows = torch.tensor(pen_rows, dtype=torch.long, device=device)
        y = x[rows]
        output_mask = counts > 0
        seen = prompt_mask | output_mask
        y = torch.where(seen, torch.where(y > 0, y / rep, y * rep), y)
        y = y - freq * counts
        y = y - pres * output_mask
        x[rows] = y
        return x

    def compute_probs(self, logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Probabilities [R, V] after temperature, top-k, top-p and min-p, for non-greedy
        rows. Filtered-out tokens have probability exactly 0."""
        num_rows, vocab_size = logits.shape
        device = logits.device
        temps = torch.tensor([p.temperature for p in params], device=device).unsqueeze(1)
        x = logits / temps
        top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        use_top_k = any(k < vocab_size for k in top_k)
        use_top_p = any(p.top_p < 1.0 for p in params)
        if use_top_k or use_top_p:
            x_sorted, order = x.sort(dim=-1, descending=True)
            mask_sorted = torch.zeros_like(x_sorted, dtype=torch.bool)
            if use_top_k:
                k = torch.tensor(top_k, dtype=torch.long, device=device).unsqueeze(1)
                kth = x_sorted.gather(1, k - 1)
                mask_sorted = x_sorted < kth  # ties with the k-th logit are kept
                x_sorted = x_sorted.masked_fill(mask_sorted, float("-inf"))
            if use_top_p:
                # keep the smallest prefix whose mass reaches p: drop a token when the mass
                # strictly before it already does. p = 1 becomes inf so rounding drops nothing.
                top_p = torch.tensor([p.top_p if p.top_p < 1.0 else float("inf") for p in params],
                                     device=device).unsqueeze(1)
                probs_sorted = x_sorted.softmax(dim=-1)
                mass_before = probs_sorted.cumsum(dim=-1) - probs_sorted
                mask_sorted = mask_sorted | (mass_before >= top_p)
            mask = torch.zeros_like(mask_sorted).scatter_(1, order, mask_sorted)
            x = x.masked_fill(mask, float("-inf"))
        probs = x.softmax(dim=-1)
        if any(p.min_p > 0.0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=device).unsqueeze(1)
            threshold = min_p * probs.amax(dim=-1, keepdim=True)
            probs = probs.masked_fill(probs < threshold, 0.0)
            probs = probs / probs.sum(dim=-1, keepdim=True)
        return probs

    @staticmethod
    def _inverse_cdf(probs: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        """For each row, the first token whose cumulative probability exceeds u * total,
        u ~ U[0, 1); seeded rows draw u from their own generator."""
        device = probs.device
        u = torch.rand(len(states), 1, dtype=torch.float64, device=device)
        for i, s in enumerate(states):
            g = s.get_generator(device)
            if g is not None:  # (a generator made on another device keeps its own stream)
                u[i] = torch.rand(1, dtype=torch.float64, generator=g, device=g.device).item()
        cdf = probs.to(torch.float64).cumsum(dim=-1)
        picked = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)
        # u * total can round up to total: then take the last token of positive probability
        last = (probs > 0).cumsum(dim=-1).argmax(dim=-1)
        return torch.minimum(picked, last)


def find_stop_string(text: str, stop: list[str], new_text_start: int) -> tuple[int, str] | None:
    """The earliest stop string in `text` that overlaps text[new_text_start:], as
    (start index, stop string), or None. Matches wholly inside the old text are ignored
    (they were checked in an earlier step), so each call is O(new text). At equal start
    indices the string listed first wins."""
    new_text_start = min(max(new_text_start, 0), len(text))
    best: tuple[int, str] | None = None
    for s in stop:
        index = text.find(s, max(0, new_text_start - len(s) + 1))
        if index != -1 and (best is None or index < best[0]):
            best = (index, s)
    return best
