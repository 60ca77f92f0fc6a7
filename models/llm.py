"""Offline API in vLLM's shape: `LLM(model=...)`, `generate`, `chat`, `stats`."""

from __future__ import annotations

import logging
from collections.abc import Sequence as Seq

import torch

from models.engine.engine import EngineConfig, LLMEngine
from models.engine.sampling import SamplingParams
from models.engine.sequence import RequestOutput
from models.loading import LoadedModel, load_model

logger = logging.getLogger(__name__)

Prompt = str | list[int]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class LLM:
    """A model plus an engine. `model` is an embedded name, a .gguf file or an HF directory."""

    def __init__(
        self,
        model: str | LoadedModel,
        dtype: str = "auto",
        kv_cache_dtype: str = "auto",
        device: str | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        kv_cache_memory_bytes: int | None = None,
        max_model_len: int | None = None,
        quantization: str = "auto",
        **engine_options,
    ) -> None:
        """`dtype`: "auto" (bf16 where the device computes it natively, else fp32; see
        models.dtypes) or a name; `kv_cache_dtype`: "auto" (the compute dtype) or a name.
        `quantization`: "auto", "gguf" (GGUF blocks kept packed) or "none" (see load_model).
        `engine_options`: further `EngineConfig` fields (batch_invariant, ...)."""
        from models.quant import engine_quantization

        quantization = engine_quantization(quantization, engine_options.get("batch_invariant", False))
        self.loaded = model if isinstance(model, LoadedModel) else load_model(
            model, dtype=dtype, device=device or default_device(), quantization=quantization
        )
        self.tokenizer = self.loaded.tokenizer
        config = EngineConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            block_size=block_size,
            enable_prefix_caching=enable_prefix_caching,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            max_model_len=max_model_len,
            kv_cache_dtype=kv_cache_dtype,
            **engine_options,
        )
        self.engine = LLMEngine(self.loaded.model, self.tokenizer, config)
        self._counter = 0

    def get_tokenizer(self):
        return self.tokenizer

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as token-id lists")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run all prompts to completion, batched; outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt
        params = sampling_params or SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling_params for {len(prompts)} prompts")
        ids = []
        for prompt, p in zip(prompts, params):
            request_id = f"gen-{self._counter}"
            self._counter += 1
            self.engine.add_request(request_id, self._encode(prompt), p)
            ids.append(request_id)
        done: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                done[out.request_id] = out
        return [done[i] for i in ids]

    def chat(
        self,
        messages: list[dict[str, str]] | Seq[list[dict[str, str]]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation, then generate."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer/chat template")
        if messages and isinstance(messages[0], dict):
            messages = [messages]
        prompts = [self.tokenizer.apply_chat_template(m, add_generation_prompt=True) for m in messages]
        return self.generate(prompts, sampling_params)

    def stats(self) -> dict:
        return self.engine.stats()
