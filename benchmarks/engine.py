"""Generation workloads through the docpipe engine, transformers `generate` and llama.cpp, one run.

    python benchmarks/engine.py [--workload w100k|short16] [--dtype auto] [--kv-cache-dtype auto]
                                [--isa native|avx2] [--llama-cpp auto|off] [--ref-batches N]

W100K (default): the first 100K cl100k tokens of Moby-Dick (benchmarks/data/moby-dick-100k.txt),
cut into token windows of 2048 with 256 overlap (56 chunks); each chunk becomes the chat prompt
"Summarize the following text..." for SmolLM2; 128 new tokens, greedy, EOS ignored.
Goal: transformers wall / docpipe wall >= 2.

short16: 16 chat prompts of about 1K model tokens each (consecutive windows of the same text,
cut in the model's tokens), 64 new tokens, greedy, EOS ignored, docpipe's default engine
settings. Goal: >= 1.5.

Prints the run's CPU, ISA, threads and dtypes; wall time, prefill and decode tok/s, peak RSS,
prefix-cache hit rate; the decode steps' effective memory bandwidth (every weight read once per
decode-only step plus each decoding sequence's whole K/V at the KV cache's element size) as a
share of the measured streaming-read bandwidth (goal >= 50%); and the same workload through
transformers `generate` at batch 8 (left-padded) in its best dtype for this CPU (what "auto"
resolves to: bf16 with native bf16, else fp32). `--ref-batches N` times only the first N
reference batches and scales the time to all of them (each batch has the same shape), to keep
a run short; 0 skips it.

llama.cpp (with `--llama-cpp auto`, where llama-cpp-python is installed: `make bench-deps`): the
same GGUF file, one stream, n_threads = --threads, llama-cpp-python's default batch size:
prefill tok/s of one ~1K-token prompt (best of 2) and decode tok/s of 64 tokens after it,
against docpipe running 8 of the short16 prompts with max_num_seqs 8 (aggregate decode tok/s
and prefill tok/s; goal >= 2 each). llama.cpp is compiled for this machine and does not follow
--isa.

--isa avx2 starts the script again with `models.cpu.isa_environment("avx2")` set before torch
loads, so docpipe's dtype choice and kernels and PyTorch/oneDNN/MKL behave as on an AVX2 CPU.
--isa avx512_bf16 does the same on a CPU with AMX, as on an AVX-512 BF16 CPU without it.
"""

from __future__ import annotations

import argparse
import inspect
import os
import time

import common

WORKLOADS = {  # name: (default new tokens, reference ratio goal)
    "w100k": (128, 2.0),
    "short16": (64, 1.5),
}


def model_dtype_args(args) -> dict:
    """LLM's dtype keywords: the options as given where LLM resolves them ("auto" included),
    else the dtype resolved here; kv_cache_dtype only where LLM takes it."""
    from models import LLM

    try:
        import models.dtypes  # noqa: F401

        kw = dict(dtype=args.dtype)
    except ImportError:
        kw = dict(dtype=common.resolve_dtype(args.dtype))
    if "kv_cache_dtype" in inspect.signature(LLM.__init__).parameters:
        kw["kv_cache_dtype"] = args.kv_cache_dtype
    return kw


def run_docpipe(prompts: list[list[int]], max_new: int, args, max_num_seqs: int) -> dict:
    from models import LLM, SamplingParams
    from models.engine.runner import kv_bytes_per_token

    llm = LLM(args.model, max_num_seqs=max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              kv_cache_memory_bytes=int(args.kv_gib * 2**30),
              batch_invariant=args.batch_invariant, **model_dtype_args(args))
    meter = common.DecodeMeter(llm.engine)
    params = SamplingParams(max_tokens=max_new, temperature=0.0, ignore_eos=True)
    llm.generate([prompts[0][:64]], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
    llm.engine.stats_.__init__()
    bm = llm.engine.block_manager
    bm.num_queries = bm.num_hits = 0
    meter.reset()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - t0
    stats = llm.stats()
    model = llm.loaded.model
    kv_bpt = stats.get("kv_bytes_per_token") or kv_bytes_per_token(model)
    weight_bytes = common.decode_weight_bytes(model)
    return dict(
        wall=wall, stats=stats, outs=outs, meter=meter, weight_bytes=weight_bytes, kv_bpt=kv_bpt,
        decode_bw=meter.bandwidth(weight_bytes, kv_bpt),
        dtype=stats.get("dtype") or common.dtype_name(model.dtype),
        kv_dtype=stats.get("kv_cache_dtype") or common.dtype_name(model.dtype),
    )


def run_transformers(prompts: list[list[int]], max_new: int, batch: int, num_batches: int,
                     dtype, args):
    import torch
    from transformers import AutoModelForCausalLM

    from models.registry import resolve_model_path

    path = resolve_model_path(args.model)
    kw = dict(gguf_file=path.name) if path.suffix == ".gguf" else {}
    model = AutoModelForCausalLM.from_pretrained(path.parent if kw else path, dtype=dtype, **kw)
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


def print_docpipe(ours: dict, bw_machine: float, label: str = "docpipe      ") -> None:
    s = ours["stats"]
    print(f"{label}: wall {ours['wall']:.1f} s | prefill {s['prefill_tok_per_s']:.0f} tok/s | "
          f"decode {s['decode_tok_per_s']:.1f} tok/s | prefix hit rate {s['prefix_cache_hit_rate']:.1%} | "
          f"preemptions {s['num_preemptions']} | peak RSS {common.peak_rss_gib():.2f} GiB")
    print(f"docpipe dtype {ours['dtype']} | kv cache dtype {ours['kv_dtype']} "
          f"({ours['kv_bpt']:,} bytes per token)")
    m = ours["meter"]
    print(f"decode effective bandwidth {ours['decode_bw'] / 1e9:.1f} GB/s = "
          f"{ours['decode_bw'] / bw_machine:.0%} of measured read bandwidth {bw_machine / 1e9:.1f} GB/s "
          f"(goal >= 50%; {m.steps} decode steps x {ours['weight_bytes'] / 1e6:.0f} MB weights + "
          f"{m.kv_tokens / 1e6:.2f} M K/V token reads x {ours['kv_bpt']:,} B)")


def llama_cpp_section(tok, args) -> None:
    if args.llama_cpp == "off":
        return
    if not common.llama_cpp_available():
        print(common.LLAMA_CPP_MISSING)
        return
    from models.registry import resolve_model_path

    path = resolve_model_path(args.model)
    if path.suffix != ".gguf":
        print(f"llama.cpp reference: {path} is not a GGUF file; skipped")
        return
    max_new = args.max_new or 64
    count = min(8, args.limit or 8)
    prompts = common.short_prompts(tok, count)
    ours = run_docpipe(prompts, max_new, args, max_num_seqs=count)
    ref = common.llama_cpp_rates(path, prompts[0], max_new, args.threads)
    s = ours["stats"]
    isa = "" if args.isa == "native" else "; built for this machine, --isa does not reach it"
    print(f"llama.cpp    : llama-cpp-python {ref['version']}, single stream, n_threads "
          f"{args.threads}, n_batch {ref['n_batch']}{isa}"
          f"{'' if ref['extra_bufts'] else ', no extra buffer types (see above)'} | prefill {ref['prefill_tok_per_s']:.0f} "
          f"tok/s ({len(prompts[0])}-token prompt) | decode {ref['decode_tok_per_s']:.1f} tok/s "
          f"({max_new} tokens)")
    print(f"docpipe x{count}   : max_num_seqs {count}, {count} prompts of ~{len(prompts[0])} tokens, "
          f"{max_new} new each | prefill {s['prefill_tok_per_s']:.0f} tok/s | aggregate decode "
          f"{s['decode_tok_per_s']:.1f} tok/s | wall {ours['wall']:.1f} s")
    print(f"ratio decode (docpipe aggregate at {count} seqs / llama.cpp single stream) = "
          f"{s['decode_tok_per_s'] / ref['decode_tok_per_s']:.2f}x (goal >= 2x)")
    print(f"ratio prefill (docpipe / llama.cpp) = "
          f"{s['prefill_tok_per_s'] / ref['prefill_tok_per_s']:.2f}x (goal >= 2x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="w100k")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    ap.add_argument("--kv-cache-dtype", default="auto",
                    help="passed to LLM where it takes it (auto: the compute dtype's choice)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new", type=int, default=None, help="new tokens (default: 128 w100k, 64 short16)")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--kv-gib", type=float, default=3.0)
    ap.add_argument("--ref-batch", type=int, default=8)
    ap.add_argument("--ref-batches", type=int, default=None, help="reference batches to time (default all)")
    ap.add_argument("--batch-invariant", action="store_true",
                    help="the engine mode `docpipe run` uses (see EngineConfig.batch_invariant)")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    ap.add_argument("--llama-cpp", choices=["auto", "off"], default="auto",
                    help="auto: compare with llama.cpp where llama_cpp is importable")
    common.add_isa_argument(ap)
    args = ap.parse_args()
    common.reexec_for_isa(args.isa)

    import torch

    torch.set_num_threads(args.threads)

    from models.loading import describe_model

    dtype = common.resolve_dtype(args.dtype)
    kv_dtype = common.resolve_kv_cache_dtype(args.kv_cache_dtype, args.dtype)
    ref_dtype = common.auto_dtype()  # the reference always runs in its best dtype here
    common.print_header(args.threads, args.isa, dtype, args.dtype, kv_dtype, args.kv_cache_dtype,
                        ref_dtype)

    max_new, goal = WORKLOADS[args.workload]
    max_new = args.max_new or max_new
    tok = describe_model(args.model).tokenizer
    if args.workload == "w100k":
        prompts = [common.chat_prompt(tok, c) for c in common.w100k_chunks()[: args.limit]]
        what = f"W100K: {len(prompts)} chunks"
    else:
        prompts = common.short_prompts(tok, min(16, args.limit or 16))
        what = f"short16: {len(prompts)} prompts"
    n_prompt = sum(map(len, prompts))
    print(f"{what}, {n_prompt} prompt tokens (model tokenizer), {max_new} new tokens each, "
          f"threads={args.threads}")
    bw_machine = common.measure_read_bandwidth()

    ours = run_docpipe(prompts, max_new, args, args.max_num_seqs)
    print_docpipe(ours, bw_machine)

    num_batches = -(-len(prompts) // args.ref_batch)
    want = num_batches if args.ref_batches is None else min(args.ref_batches, num_batches)
    if want > 0:
        t_ref, ref_outs, timed, total = run_transformers(prompts, max_new, args.ref_batch, want,
                                                         ref_dtype, args)
        same = sum(a.token_ids == b for a, b in zip(ours["outs"], ref_outs))
        note = "" if timed == total else f" (timed {timed}/{total} batches, scaled)"
        print(f"transformers : wall {t_ref:.1f} s at batch {args.ref_batch}{note}, "
              f"{common.dtype_name(ref_dtype)} | peak RSS {common.peak_rss_gib():.2f} GiB (whole process)")
        print(f"ratio (transformers wall / docpipe wall) = {t_ref / ours['wall']:.2f}x "
              f"(goal >= {goal:g}x)   identical greedy outputs: {same}/{len(ref_outs)}")

    llama_cpp_section(tok, args)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
