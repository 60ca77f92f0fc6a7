"""Prefill throughput of one 2048-token prompt: docpipe vs transformers, same weights, one run.

    python benchmarks/forward.py [--model smollm2-135m-instruct] [--tokens 2048] [--dtype auto]
                                 [--isa native|avx2]

Inputs are seeded random token ids. Each side does a warm-up pass, then --repeats rounds that
time docpipe, transformers and the GEMM peak's shapes in turns; the best of each is kept (on a
shared host whose speed drifts, only measurements taken in turns compare). docpipe computes logits for the last position only (what prefill needs);
transformers is asked for the same with `logits_to_keep=1`, in the same dtype as docpipe
(--dtype auto: bf16 on CPUs with native bf16, else fp32; the header says which).

docpipe is timed as the engine runs a prefill: K/V written to a paged cache and attention read
from it (the ratio uses this; goal >= 1.3). Its cache-less path (tests and scoring only) is
printed too.

Roofline: the peak GEMM rate is measured in the compute dtype with `F.linear` on the model's
own linear weight shapes at M = --tokens rows (best per shape, in the same rounds, weighted by how
often each occurs). The model's FLOPs for the prompt are 2 x matmul weights per token, QK^T and PV
over the causal context, and the vocabulary projection for the last row only; the prefill rate
is printed as a share of the tokens/s that peak allows (goal >= 85%).

--isa avx2 starts the script again with `models.cpu.isa_environment("avx2")` set before torch
loads, so docpipe's dtype choice and kernels and PyTorch/oneDNN/MKL behave as on an AVX2 CPU.
--isa avx512_bf16 does the same on a CPU with AMX, as on an AVX-512 BF16 CPU without it.
"""

from __future__ import annotations

import argparse
import os

import common


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    ap.add_argument("--quantization", default="auto",
                    help="auto (the engine's default: GGUF weights kept packed), gguf or none "
                         "(dequantized at load)")
    ap.add_argument("--repeats", type=int, default=5,
                    help="rounds; each times every side once, in turns (best of each kept)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    common.add_isa_argument(ap)
    args = ap.parse_args()
    common.reexec_for_isa(args.isa)

    import torch

    torch.set_num_threads(args.threads)

    from models.attention import AttentionMetadata, SeqSpan
    from models.engine.runner import ModelRunner
    from models.loading import load_model
    from models.quant import packed_bytes
    from models.registry import resolve_model_path

    dtype = common.resolve_dtype(args.dtype)
    common.print_header(args.threads, args.isa, dtype, args.dtype, ref_dtype=dtype)
    loaded = load_model(args.model, dtype=dtype, quantization=args.quantization)
    ours = loaded.model
    vocab = loaded.config.vocab_size
    n = args.tokens
    ids = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(n)

    block = 16
    runner = ModelRunner(ours, num_blocks=-(-n // block), block_size=block)

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

    # docpipe, its cache-less path, transformers and the GEMM peak's shapes timed in turns
    fns = {"ours": run_ours, "dense": run_ours_dense, "ref": run_ref,
           **common.gemm_peak_fns(common.linear_shapes(ours), n, dtype)}
    best = common.best_of_interleaved(fns, args.repeats)
    t_ours, t_dense, t_ref = best["ours"], best["dense"], best["ref"]
    with torch.inference_mode():
        ref_logits = run_ref()[0].float()
        diff = (run_ours().float() - ref_logits).abs().max().item()
        diff_dense = (run_ours_dense().float() - ref_logits).abs().max().item()

    gemm_peak = common.gemm_peak(best, n)
    flops = common.prefill_flops(ours, n)
    allowed = n * gemm_peak / flops  # tok/s if every FLOP ran at the measured GEMM peak

    print(f"model={args.model} dtype={common.dtype_name(dtype)} tokens={n} threads={args.threads} "
          f"weights={'packed' if packed_bytes(ours) else 'dense'}")
    print(f"docpipe      : {t_ours:.3f} s  {n / t_ours:8.0f} tok/s   "
          f"(cache-less path: {t_dense:.3f} s, {n / t_dense:.0f} tok/s)")
    print(f"transformers : {t_ref:.3f} s  {n / t_ref:8.0f} tok/s")
    print(f"ratio (docpipe tok/s / transformers tok/s) = {t_ref / t_ours:.2f} (goal >= 1.3)   "
          f"last-token logit max diff {diff:.3g} (cache-less {diff_dense:.3g})   "
          f"peak RSS {common.peak_rss_gib():.2f} GiB")
    print(f"model FLOPs  : {flops / n / 1e6:.1f} MFLOP/token at {n} tokens "
          f"({flops / 1e9:.1f} GFLOP for the prompt)")
    print(f"prefill {n / t_ours:.0f} tok/s = {n / t_ours / allowed:.0%} of the {allowed:.0f} tok/s "
          f"the measured GEMM peak ({gemm_peak / 1e9:.1f} GFLOP/s, {common.dtype_name(dtype)}, "
          f"M={n}) allows (goal >= 85%)")


if __name__ == "__main__":
    main()
