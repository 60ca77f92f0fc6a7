"""Prefill throughput of one 2048-token prompt: docpipe vs transformers, same weights, one run.

    python benchmarks/forward.py [--model smollm2-135m-instruct] [--tokens 2048] [--dtype bfloat16]

Inputs are seeded random token ids. Each side does a warm-up pass, then the best of --repeats
timed passes. docpipe computes logits for the last position only (what prefill needs);
transformers is asked for the same with `logits_to_keep=1`.

docpipe is timed as the engine runs a prefill: K/V written to a paged cache and attention read
from it (the ratio uses this). Its cache-less path (tests and scoring only) is printed too.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from models.attention import AttentionMetadata
    from models.loading import load_model, resolve_dtype
    from models.registry import resolve_model_path

    dtype = resolve_dtype(args.dtype)
    loaded = load_model(args.model, dtype=dtype)
    ours = loaded.model
    vocab = loaded.config.vocab_size
    ids = torch.randint(0, vocab, (args.tokens,), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(args.tokens)

    from models.attention import SeqSpan
    from models.engine.runner import ModelRunner

    block = 16
    runner = ModelRunner(ours, num_blocks=-(-args.tokens // block), block_size=block)
    n = args.tokens

    @torch.inference_mode()
    def run_ours():
        # one sequence's whole prompt in one step, in consecutive blocks (as the engine does)
        meta = AttentionMetadata([SeqSpan(0, n, n, 0, [slice(0, n)], n)], torch.arange(n))
        hidden = ours(ids, pos, meta, runner.kv_caches)
        return ours.compute_logits(hidden[-1:])

    @torch.inference_mode()
    def run_ours_dense():
        hidden = ours(ids, pos, AttentionMetadata.for_dense([n]))
        return ours.compute_logits(hidden[-1:])

    t_ours = best_of(run_ours, args.repeats)
    t_dense = best_of(run_ours_dense, args.repeats)

    from transformers import AutoModelForCausalLM

    path = resolve_model_path(args.model)
    if path.suffix == ".gguf":
        ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    else:
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    ref.eval()

    @torch.inference_mode()
    def run_ref():
        return ref(ids.unsqueeze(0), logits_to_keep=1, use_cache=False).logits

    t_ref = best_of(run_ref, args.repeats)
    with torch.inference_mode():
        ref_logits = run_ref()[0].float()
        diff = (run_ours().float() - ref_logits).abs().max().item()
        diff_dense = (run_ours_dense().float() - ref_logits).abs().max().item()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    n = args.tokens
    print(f"model={args.model} dtype={args.dtype} tokens={n} threads={args.threads}")
    print(f"docpipe      : {t_ours:.3f} s  {n / t_ours:8.0f} tok/s   "
          f"(cache-less path: {t_dense:.3f} s, {n / t_dense:.0f} tok/s)")
    print(f"transformers : {t_ref:.3f} s  {n / t_ref:8.0f} tok/s")
    print(f"ratio (docpipe tok/s / transformers tok/s) = {t_ref / t_ours:.2f}   "
          f"last-token logit max diff {diff:.3g} (cache-less {diff_dense:.3g})   peak RSS {peak:.2f} GiB")


if __name__ == "__main__":
    main()
