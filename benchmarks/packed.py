"""GGUF weights kept packed (quantization="gguf") against dequantized at load ("none"), same run.

For one GGUF model (default: Qwen2.5-Coder-0.5B-Instruct, Q4_K_M), each mode in turn:
resident weight memory (summed tensor bytes, and the process RSS delta across the load), then
decode tok/s at --seqs sequences: seeded random prompts, EOS ignored, a warm-up run first;
decode time = time(prompt + N new tokens) - time(prompt + 1 new token), per sequence N - 1
decode steps. The packed path's effective read bandwidth (packed bytes per decode step / step
time) is printed against the machine's streaming read bandwidth.

    .venv/bin/python benchmarks/packed.py [--model NAME] [--seqs 8] [--isa avx2]

Measured (AMD EPYC, 2 shared cores, heavily loaded by other jobs: load average 5-10, so the
times are noisy; defaults: 8 x 32 prompt tokens, 17 new, fp32), Qwen2.5-Coder-0.5B Q4_K_M
(468.6 MiB file):

    weights      packed 463.0 MiB (0.99x the file; RSS delta 567 MiB) vs 2403.9 MiB fp32 (5.13x)
    native       decode 4.4 vs 3.6 tok/s = 1.20x; prefill+1 7.9 vs 8.2 s (avx512 kernel path)
    --isa avx2   decode 8.0 vs 3.2 tok/s = 2.49x; prefill+1 10.2 vs 5.5 s (avx2 kernel path)

Effective read bandwidth of the packed decode: 0.3-0.5 GB/s of 13-15 GB/s streaming: decode is
not bandwidth-bound here; each parallel region waits for a scheduler slice on the busy cores
(measured: about 15 ms per packed matmul call whatever its size, under load 14).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def tensor_bytes(model) -> int:
    import torch

    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def run_mode(args, quantization: str, prompts) -> dict:
    from models import LLM, SamplingParams
    from models.loading import load_model
    from models.quant import packed_bytes

    gc.collect()
    rss0 = rss_bytes()
    loaded = load_model(args.model, dtype=args.dtype, quantization=quantization)
    gc.collect()
    rss1 = rss_bytes()
    llm = LLM(loaded, max_num_seqs=args.seqs, enable_prefix_caching=False)

    def gen(max_tokens: int, llm=llm) -> float:
        sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp)
        elapsed = time.perf_counter() - t0
        assert all(len(o.token_ids) == max_tokens for o in outs)
        return elapsed

    gen(4)  # warm-up
    t1 = min(gen(1) for _ in range(args.repeats))
    tn = min(gen(args.new_tokens) for _ in range(args.repeats))
    steps = args.new_tokens - 1
    step_s = (tn - t1) / steps
    out = {"mode": quantization, "weights": tensor_bytes(loaded.model), "rss": rss1 - rss0,
           "packed": packed_bytes(loaded.model), "step_s": step_s,
           "decode_tok_s": args.seqs / step_s, "prefill_s": t1, "dtype": loaded.model.dtype}
    del llm, loaded
    gc.collect()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--seqs", type=int, default=8, help="sequences decoded together")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=17)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--dtype", default="float32",
                    help="compute dtype (float32: the fp32 dequantized path of the goal)")
    ap.add_argument("--modes", default="gguf,none")
    common.add_isa_argument(ap)
    args = ap.parse_args()
    common.reexec_for_isa(args.isa)

    import torch

    from models.quant import kernel_path
    from models.registry import resolve_model_path

    threads = torch.get_num_threads()
    common.print_header(threads, args.isa, common.resolve_dtype(args.dtype), args.dtype)
    path = resolve_model_path(args.model)
    file_bytes = path.stat().st_size
    print(f"model        : {args.model} ({path.name}, {file_bytes / 2**20:.1f} MiB)")
    print(f"kernel path  : {kernel_path()}")
    print(f"workload     : {args.seqs} sequences x {args.prompt_tokens} random prompt tokens, "
          f"{args.new_tokens} new (EOS ignored), best of {args.repeats}")
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 20000, (args.prompt_tokens,), generator=gen).tolist()
               for _ in range(args.seqs)]
    results = {}
    for mode in args.modes.split(","):
        r = results[mode] = run_mode(args, mode, prompts)
        print(f"{r['mode']:5s}: weights {r['weights'] / 2**20:7.1f} MiB "
              f"({r['weights'] / file_bytes:.2f}x file; RSS delta {r['rss'] / 2**20:.1f} MiB), "
              f"decode {r['decode_tok_s']:6.1f} tok/s ({r['step_s'] * 1e3:.1f} ms/step), "
              f"prefill+1 {r['prefill_s']:.2f} s", flush=True)
    bandwidth = common.measure_read_bandwidth()
    if "gguf" in results:
        r = results["gguf"]
        eff = r["packed"] / r["step_s"]
        print(f"packed decode reads {r['packed'] / 2**20:.1f} MiB of blocks per step: "
              f"{eff / 1e9:.1f} GB/s = {eff / bandwidth:.0%} of the {bandwidth / 1e9:.1f} GB/s "
              "streaming read bandwidth")
    if {"gguf", "none"} <= results.keys():
        print(f"packed / dequantized decode: "
              f"{results['gguf']['decode_tok_s'] / results['none']['decode_tok_s']:.2f}x; "
              f"weights {results['gguf']['weights'] / results['none']['weights']:.2f}x")
    print(f"peak RSS {common.peak_rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()
