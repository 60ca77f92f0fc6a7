"""KV-cache bytes per token of multi-head latent attention (deepseek_v3's latent cache: one
entry of kv_lora_rank + qk_rope_head_dim values per token and layer) against GQA models of the
same hidden size, as `llm.stats()` reports them, and what a fixed KV budget holds.

Measured: two random-weight models of width 2048 with DeepSeek-V2-Lite's attention shape
(16 heads; MLA kv_lora_rank 512, qk_rope_head_dim 64, qk_nope_head_dim 128, v_head_dim 128;
GQA head_dim 128 with `--kv-heads` KV heads), `--layers` layers, fp32, run through the engine
(a few prompts prefilled and decoded greedily; EOS ignored; a warm-up pass excluded). Also
printed, from the configs alone: the full-size DeepSeek-V3 shape (61 layers, width 7168, bf16)
against GQA models of width 7168 (56 heads of 128) with 1, 8 and 56 KV heads.

One thread by default: on this project's 2 shared cores (load 5-6 from other sessions) two
OpenMP threads turn each of the many small decode ops into a wait for the other core
(measured: one absorbed decode attention call 67 ms with 2 threads, 0.2 ms with 1).

    .venv/bin/python benchmarks/mla_kv.py [--layers 2] [--kv-heads 4] [--prompt-len 128] [--threads 1]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def mla_config(layers: int, vocab: int, hidden: int = 2048, heads: int = 16, **extra):
    from models.config import ModelConfig

    return ModelConfig(
        model_type="deepseek_v3", name="mla-bench", vocab_size=vocab, hidden_size=hidden,
        intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
        v_head_dim=128, q_lora_rank=None, rope_interleave=True, max_position_embeddings=4096,
        eos_token_id=1, bos_token_id=0, **extra)


def gqa_config(layers: int, vocab: int, kv_heads: int, hidden: int = 2048, heads: int = 16):
    from models.config import ModelConfig

    return ModelConfig(
        model_type="llama", name="gqa-bench", vocab_size=vocab, hidden_size=hidden,
        intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=128, max_position_embeddings=4096,
        eos_token_id=1, bos_token_id=0)


def bytes_per_token(config, elem: int) -> int:
    """What `models.engine.runner.kv_bytes_per_token` gives, from the config alone."""
    num_tensors, num_heads, dim = config.kv_cache_entry
    return num_tensors * config.num_hidden_layers * num_heads * dim * elem


def run_engine(config, args) -> dict:
    import torch

    from models.engine.engine import EngineConfig, LLMEngine
    from models.engine.sampling import SamplingParams
    from models.loading import build_model

    model = build_model(config, torch.float32, "cpu").init_random_weights(seed=0)
    engine = LLMEngine(model, None, EngineConfig(
        kv_cache_memory_bytes=args.budget_mib << 20, max_num_batched_tokens=1024,
        block_size=16), eos_token_ids=frozenset())
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)

    def run(tag: str, num: int) -> tuple[float, int]:
        for i in range(num):
            ids = torch.randint(2, config.vocab_size, (args.prompt_len,), generator=gen).tolist()
            engine.add_request(f"{tag}{i}", ids, params)
        t0, steps, peak_blocks = time.perf_counter(), 0, 0
        while engine.has_unfinished():
            engine.step()
            steps += 1
            peak_blocks = max(peak_blocks, engine.block_manager.num_used_blocks)
        return time.perf_counter() - t0, peak_blocks

    run("warm", 1)
    before = engine.stats()
    seconds, peak_blocks = run("r", args.num_prompts)
    stats = engine.stats()
    prefill = stats["num_prefill_tokens"] - before["num_prefill_tokens"]
    decode = stats["num_decode_tokens"] - before["num_decode_tokens"]
    pre_s = stats["prefill_time_s"] - before["prefill_time_s"]
    dec_s = stats["decode_time_s"] - before["decode_time_s"]
    return dict(stats=stats, seconds=seconds, prefill=prefill, decode=decode,
                prefill_tps=prefill / pre_s if pre_s else 0.0,
                decode_tps=decode / dec_s if dec_s else 0.0,
                peak_kv=peak_blocks * 16 * stats["kv_bytes_per_token"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--kv-heads", type=int, default=4, help="KV heads of the GQA model (of 16)")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--num-prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--budget-mib", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from models.cpu import cpu_info

    torch.set_num_threads(args.threads)
    print(f"cpu          : {cpu_info().describe()}")
    print(f"torch        : {torch.__version__}, threads {args.threads}, fp32, KV budget "
          f"{args.budget_mib} MiB, {args.num_prompts} prompts x {args.prompt_len} tokens + "
          f"{args.new_tokens} new")
    mla = mla_config(args.layers, args.vocab)
    gqa = gqa_config(args.layers, args.vocab, args.kv_heads)
    results = {}
    for name, config in (("mla", mla), (f"gqa{args.kv_heads}", gqa)):
        r = results[name] = run_engine(config, args)
        s = r["stats"]
        assert s["kv_bytes_per_token"] == bytes_per_token(config, 4), "stats disagree with config"
        tokens = s["num_blocks"] * s["block_size"]
        print(f"{name:6s}: {s['kv_bytes_per_token']:6d} B/token "
              f"({s['kv_bytes_per_token'] // args.layers} per layer); the budget holds {tokens} "
              f"tokens; peak KV held {r['peak_kv'] / 2**20:.1f} MiB | {r['prefill'] + r['decode']} "
              f"tokens in {r['seconds']:.2f} s, prefill {r['prefill_tps']:.0f} tok/s, decode "
              f"{r['decode_tps']:.1f} tok/s, peak RSS "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    m, g = (results[k]["stats"]["kv_bytes_per_token"] for k in results)
    print(f"width 2048, {args.layers} layers: MLA / GQA ({args.kv_heads} of 16 KV heads, head_dim "
          f"128) bytes per token = {m} / {g} = {m / g:.3f}")
    print("full size, from the configs (bf16, 61 layers, width 7168):")
    v3 = mla_config(61, 129_280, hidden=7168, heads=128)
    b3 = bytes_per_token(v3, 2)
    for kv_heads in (1, 8, 56):
        other = gqa_config(61, 129_280, kv_heads, hidden=7168, heads=56)
        b = bytes_per_token(other, 2)
        print(f"  deepseek_v3 latent {b3} B/token vs GQA {kv_heads:2d} KV heads x 128: {b} "
              f"B/token = {b3 / b:.3f}")


if __name__ == "__main__":
    main()
