"""Tiny random models and a slow greedy reference for engine tests."""

from __future__ import annotations

import torch

from models.config import tiny_config
from models.engine.engine import EngineConfig, LLMEngine
from models.engine.runner import kv_bytes_per_token
from models.loading import build_model


def tiny_model(model_type: str = "llama", seed: int = 1, **overrides):
    config = tiny_config(model_type, **overrides)
    return build_model(config, torch.float32, "cpu").init_random_weights(seed=seed, std=0.1)


def make_engine(model, num_blocks: int = 256, **kwargs) -> LLMEngine:
    block_size = kwargs.get("block_size", 16)
    budget = num_blocks * block_size * kv_bytes_per_token(model)
    config = EngineConfig(kv_cache_memory_bytes=budget, **kwargs)
    return LLMEngine(model, None, config, eos_token_ids=frozenset())


def run_all(engine: LLMEngine, prompts, params) -> list:
    if not isinstance(params, list):
        params = [params] * len(prompts)
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", p, sp)
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            done[out.request_id] = out
        engine.block_manager.check_invariants()
    return [done[f"r{i}"] for i in range(len(prompts))]


def greedy_reference(model, prompt: list[int], num_tokens: int) -> list[int]:
    """One sequence, no cache: recompute the whole sequence for every token."""
    ids = list(prompt)
    for _ in range(num_tokens):
        logits = model.logits_dense(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def random_prompts(n: int, seed: int = 0, max_len: int = 60, vocab: int = 256) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len, (n,), generator=g).tolist()
    return [torch.randint(2, vocab, (k,), generator=g).tolist() for k in lengths]
