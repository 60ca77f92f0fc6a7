"""Perplexity of a model over token ids, in non-overlapping windows.

    ids:  t0 t1 ... t(w-1) | tw ... t(2w-1) | ... | last partial window (>= 2 tokens)
          each window is scored on its own (no context from the one before): w - 1
          predictions per window, so N = sum over windows of (len - 1)

perplexity = exp(total negative log-likelihood / N), the NLL in fp32 from fp32 logits. This is
what transformers' `labels=` loss computes per window, summed over windows by token count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class PerplexityResult:
    nll_sum: float  # natural-log NLL summed over the predicted tokens
    num_tokens: int  # predicted tokens (each window's first token is not predicted)
    num_windows: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / self.num_tokens) if self.num_tokens else float("nan")


def windows(token_ids: list[int], window: int, max_tokens: int | None = None) -> list[list[int]]:
    """Non-overlapping windows of `window` ids over the first `max_tokens` ids; a last window
    shorter than 2 ids (nothing to predict) is dropped."""
    if window < 2:
        raise ValueError(f"window={window} must be at least 2 (a window predicts window - 1 tokens)")
    ids = token_ids if max_tokens is None else token_ids[:max_tokens]
    out = [ids[i : i + window] for i in range(0, len(ids), window)]
    return [w for w in out if len(w) >= 2]


@torch.inference_mode()
def perplexity(model, token_ids: list[int], window: int = 1024,
               max_tokens: int | None = None) -> PerplexityResult:
    """`model`: a TransformerLM (its `logits_dense`, no KV cache)."""
    nll, count, parts = 0.0, 0, windows(token_ids, window, max_tokens)
    for part in parts:
        ids = torch.tensor([part], device=model.device)
        logits = model.logits_dense(ids)[0, :-1].float()  # [T-1, V]
        nll += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += len(part) - 1
    return PerplexityResult(nll, count, len(parts))


@torch.inference_mode()
def greedy_tokens(model, prompt_ids: list[int], num_tokens: int) -> list[int]:
    """Greedy continuation without a cache (reference use: a full forward per token)."""
    ids = list(prompt_ids)
    for _ in range(num_tokens):
        logits = model.logits_dense(torch.tensor([ids], device=model.device))[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt_ids):]
