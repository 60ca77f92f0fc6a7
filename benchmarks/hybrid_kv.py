"""KV-cache memory held by one long prompt on a Gemma-3-270M-shaped model: the hybrid KV
cache (a block pool per KV cache group; the sliding-window layers release blocks behind the
window) against the same model with every layer on full attention (one pool, every block
kept).

Gemma-3-270M's shape: 18 layers, 5 of every 6 sliding (window 512), 1 KV head, head_dim 256
(fp32 here: 4 bytes a value). The KV bytes are the blocks the sequence holds in each group
times that group's bytes per block (layers x K and V x 1 head x 256 x 4 x block_size), taken
at the peak over all steps (during a prefill piece the sliding group also holds the piece)
and at the first decode step (after the prompt). Expected ratio: about 3/18 + 15/18 x 512/T.

Two modes, the same scheduler and block managers:
- default, block accounting: the engine's Scheduler and BlockManager / HybridBlockManager
  step through the prompt in pieces without a forward (seconds);
- `--forward`: the real engine with random weights (vocabulary cut to `--vocab`, which holds
  no K/V), hybrid only; a 32K-token prefill takes minutes on 2 cores.

    .venv/bin/python benchmarks/hybrid_kv.py [--tokens 32768] [--forward]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def cpu_model_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def gemma3_270m_config(all_full: bool, vocab: int, max_len: int):
    from models.config import ModelConfig

    num_layers = 18
    kinds = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(num_layers)]
    if all_full:
        kinds = ["full_attention"] * num_layers
    return ModelConfig(
        model_type="gemma3_text", name="gemma-3-270m-shape", vocab_size=vocab, hidden_size=640,
        intermediate_size=2048, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, hidden_act="gelu_pytorch_tanh",
        sliding_window=512, layer_types=kinds, query_pre_attn_scalar=256,
        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, tie_word_embeddings=True,
        max_position_embeddings=max_len, rms_norm_eps=1e-6, eos_token_id=1, bos_token_id=2,
    )


def group_block_bytes(config, block_size: int, elem: int = 4) -> list[int]:
    from models.engine.runner import kv_cache_groups

    return [2 * len(g.layer_ids) * config.num_key_value_heads * config.head_dim * elem * block_size
            for g in kv_cache_groups(config)]


class HeldMeter:
    """Blocks one sequence holds per group, after each step's allocation."""

    def __init__(self, block_bytes: list[int]) -> None:
        self.block_bytes = block_bytes
        self.peak_bytes = 0
        self.peak_blocks: list[int] = []
        self.first_decode_bytes = None
        self.first_decode_blocks = None

    def record(self, seq, is_decode: bool) -> None:
        blocks = [sum(1 for b in t if b >= 0) for t in seq.block_tables]
        kv = sum(n * b for n, b in zip(blocks, self.block_bytes))
        if kv > self.peak_bytes:
            self.peak_bytes, self.peak_blocks = kv, blocks
        if is_decode and self.first_decode_bytes is None:
            self.first_decode_bytes, self.first_decode_blocks = kv, blocks


def run_accounting(config, args) -> HeldMeter:
    """Scheduler + block manager(s) as the engine builds them, no forward."""
    from models.engine.block_manager import BlockManager, HybridBlockManager
    from models.engine.engine import split_kv_blocks
    from models.engine.runner import kv_cache_groups
    from models.engine.sampling import SamplingParams
    from models.engine.scheduler import Scheduler
    from models.engine.sequence import Sequence

    bs = args.block_size
    groups = kv_cache_groups(config)
    block_bytes = group_block_bytes(config, bs)
    budget = -(-(args.tokens + args.new) // bs) * sum(block_bytes)  # all-full's need
    if len(groups) == 1:
        bm = BlockManager(budget // block_bytes[0], bs, release_window=groups[0].window,
                          reserve_decode=True)
    else:
        num_blocks = split_kv_blocks(budget, groups, [b // bs for b in block_bytes], bs,
                                     args.max_num_seqs, args.max_num_batched_tokens)
        bm = HybridBlockManager(num_blocks, bs, [g.window for g in groups], reserve_decode=True)
    sched = Scheduler(bm, args.max_num_seqs, args.max_num_batched_tokens)
    prompt = list(range(3, 3 + args.tokens))
    seq = Sequence("long", prompt, SamplingParams(max_tokens=args.new, ignore_eos=True),
                   num_kv_groups=len(groups))
    sched.add(seq)
    meter = HeldMeter(block_bytes)
    while sched.has_unfinished():
        batch = sched.schedule()
        meter.record(seq, batch.num_decode_tokens > 0)
        for s, n in zip(batch.seqs, batch.num_new_tokens):
            s.num_computed_tokens += n
            bm.cache_full_blocks(s)
            if s.num_computed_tokens == s.num_tokens:
                s.append_token(7)
                if len(s.output_token_ids) >= args.new:
                    sched.finish(s)
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_blocks, "blocks not returned to the pool"
    return meter


def run_forward(config, args) -> tuple[HeldMeter, float]:
    import torch

    from models.engine.engine import EngineConfig, LLMEngine
    from models.engine.sampling import SamplingParams
    from models.loading import build_model

    bs = args.block_size
    block_bytes = group_block_bytes(config, bs)
    model = build_model(config, torch.float32, "cpu").init_random_weights(seed=0, std=0.02)
    budget = -(-(args.tokens + args.new) // bs) * sum(block_bytes)
    engine = LLMEngine(model, None, EngineConfig(
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=bs, kv_cache_memory_bytes=budget), eos_token_ids=frozenset())
    prompt = torch.randint(3, config.vocab_size, (args.tokens,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    engine.add_request("long", prompt, SamplingParams(max_tokens=args.new, temperature=0.0,
                                                      ignore_eos=True))
    seq = engine.requests["long"]
    meter = HeldMeter(block_bytes)
    schedule = engine.scheduler.schedule

    def recording_schedule():
        batch = schedule()
        if batch.seqs:
            meter.record(seq, batch.num_decode_tokens > 0)
        return batch

    engine.scheduler.schedule = recording_schedule
    t0 = time.perf_counter()
    out = []
    while engine.has_unfinished():
        out += engine.step()
    seconds = time.perf_counter() - t0
    assert out[0].num_generated_tokens == args.new
    return meter, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=32768, help="prompt tokens (32768)")
    ap.add_argument("--new", type=int, default=4, help="tokens generated after it (4)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048,
                    help="prefill piece per step (2048, the engine's default)")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--forward", action="store_true",
                    help="run the real engine with random weights (hybrid), not only the accounting")
    ap.add_argument("--vocab", type=int, default=4096,
                    help="vocabulary for --forward (262144 in the real model; holds no K/V)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    max_len = args.tokens + args.new + 1
    hybrid_cfg = gemma3_270m_config(False, args.vocab, max_len)
    full_cfg = gemma3_270m_config(True, args.vocab, max_len)
    print(f"cpu: {cpu_model_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"model: Gemma-3-270M shape, 18 layers (15 sliding, window 512; 3 full), 1 KV head, "
          f"head_dim 256, fp32 K/V; prompt {args.tokens} tokens + {args.new} generated, "
          f"block_size {args.block_size}, pieces of {args.max_num_batched_tokens}")
    full = run_accounting(full_cfg, args)
    if args.forward:
        hybrid, seconds = run_forward(hybrid_cfg, args)
        mode = f"forward with random weights, {seconds:.1f} s"
    else:
        hybrid = run_accounting(hybrid_cfg, args)
        mode = "block accounting (scheduler + block managers, no forward)"
    expected = 3 / 18 + 15 / 18 * min(1.0, 512 / args.tokens)
    mib = 2**20
    print(f"mode: {mode}")
    print(f"all full attention: {full.peak_bytes / mib:.1f} MiB held ({full.peak_blocks} blocks)")
    print(f"hybrid, peak (a prefill piece in flight): {hybrid.peak_bytes / mib:.1f} MiB "
          f"(blocks per group [full, sliding] {hybrid.peak_blocks}) = "
          f"{hybrid.peak_bytes / full.peak_bytes:.1%} of all-full")
    print(f"hybrid, after the prompt (first decode step): {hybrid.first_decode_bytes / mib:.1f} MiB "
          f"({hybrid.first_decode_blocks}) = {hybrid.first_decode_bytes / full.peak_bytes:.1%} "
          f"of all-full; expected about 3/18 + 15/18 x 512/{args.tokens} = {expected:.1%}")


if __name__ == "__main__":
    main()
