"""Paged attention against a slow reference that gathers K/V slot by slot and applies masks,
and the native attention kernels against the pure-torch path, for each (compute, KV cache)
dtype pair, built for this CPU and for x86-64-v3 (their AVX2 paths, tested on any x86 CPU
that has AVX2)."""

import math
import shutil

import pytest
import torch

from models import native
from models.attention import Attention, AttentionMetadata, SeqSpan
from models.config import tiny_config
from models.cpu import cpu_info
from models.layers import RotaryEmbedding, apply_rotary
from tests.models.kernel_builds import BUILDS, kernel_build

BLOCK = 4


class CountingKernel:
    """The native decode kernel, counting the rows it computed."""

    def __init__(self, kernel):
        self.kernel, self.rows = kernel, 0
        self.max_dim, self.max_group = kernel.max_dim, kernel.max_group

    def __call__(self, *args):
        self.rows += args[13]
        return self.kernel(*args)


@pytest.fixture(params=["native", "torch"])
def decode_path(request, monkeypatch):
    """Decode rows through the native kernel (counted), or through the pure-torch path."""
    if request.param == "torch":
        monkeypatch.setattr(native, "paged_decode", lambda: None)
        return None
    kernel = native.paged_decode()
    if kernel is None:
        # The kernel must build wherever a compiler is installed (CI has g++).
        assert shutil.which("g++") is None, "g++ is installed but the native kernel failed"
        pytest.skip("no C++ compiler: the native decode kernel is not built")
    counting = CountingKernel(kernel)
    monkeypatch.setattr(native, "paged_decode", lambda: counting)
    return counting


def _layer(num_kv_heads, window):
    config = tiny_config("mistral", num_key_value_heads=num_kv_heads, sliding_window=window)
    attn = Attention(config, 0)
    g = torch.Generator().manual_seed(0)
    for p in attn.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return config, attn


def _reference(attn, config, x, span, positions, k_cache, v_cache, table, window):
    """softmax(q k^T / sqrt(d) + mask) v with K/V read one slot at a time through `table`."""
    H, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    rope = RotaryEmbedding(config)
    cos, sin = rope.cos_sin(positions, x.dtype)
    q = attn.qkv_proj(x).split(attn.split_sizes, dim=-1)[0].view(-1, H, D)
    q = apply_rotary(q, cos, sin)
    ctx = span.context_len
    keys = torch.stack([k_cache[:, table[p // BLOCK] * BLOCK + p % BLOCK] for p in range(ctx)], 1)
    values = torch.stack([v_cache[:, table[p // BLOCK] * BLOCK + p % BLOCK] for p in range(ctx)], 1)
    keys = keys.repeat_interleave(H // Hkv, dim=0)  # [H, ctx, D]
    values = values.repeat_interleave(H // Hkv, dim=0)
    out = torch.empty_like(q)
    for i, p in enumerate(positions.tolist()):
        scores = torch.einsum("hd,hkd->hk", q[i], keys) / math.sqrt(D)
        k_pos = torch.arange(ctx)
        allowed = (k_pos <= p) & (k_pos >= span.kv_start)
        if window is not None:
            allowed &= p - k_pos < window
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[i] = torch.einsum("hk,hkd->hd", scores.softmax(-1), values)
    return attn.o_proj(out.reshape(len(positions), H * D))


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("consecutive", [True, False])
@pytest.mark.parametrize("align", [None, 4], ids=["one-call", "aligned-groups"])
def test_paged_attention_matches_reference(num_kv_heads, window, consecutive, align, decode_path):
    """`align` splits prefill spans into batch-invariant query groups (models.attention):
    the same values, computed in several calls. Single-query rows run through the native
    kernel or the torch path (`decode_path`)."""
    config, attn = _layer(num_kv_heads, window)
    g = torch.Generator().manual_seed(1)
    num_blocks = 64
    Hkv, D = attn.num_kv_heads, attn.head_dim
    k_cache = torch.randn(Hkv, num_blocks * BLOCK, D, generator=g)
    v_cache = torch.randn(Hkv, num_blocks * BLOCK, D, generator=g)
    # (cached context, new tokens): prefill from scratch, prefill after a cached prefix,
    # decode steps; lengths not multiples of the block size.
    # The (3, 9) span recomputes 2 generated tokens after its 10-token prompt (a preemption).
    cases = [(0, 7), (5, 6), (13, 1), (22, 1), (3, 9), (9, 1)]
    prompt_lens = [7, 11, 13, 22, 10, 9]
    free = list(range(num_blocks))
    if not consecutive:
        free = torch.randperm(num_blocks, generator=g).tolist()
    spans, xs, pos_list, slots, tables = [], [], [], [], []
    row = 0
    for (cached, new), prompt_len in zip(cases, prompt_lens):
        ctx = cached + new
        n_blocks = -(-ctx // BLOCK)
        table = [free.pop(0) for _ in range(n_blocks)]
        tables.append(table)
        positions = torch.arange(cached, ctx)
        slot = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in positions.tolist()])
        # runs of consecutive slots, built slot by slot (one run when the table is consecutive)
        runs = []
        for p in range(ctx):
            slot_p = table[p // BLOCK] * BLOCK + p % BLOCK
            if runs and runs[-1].stop == slot_p:
                runs[-1] = slice(runs[-1].start, slot_p + 1)
            else:
                runs.append(slice(slot_p, slot_p + 1))
        assert (len(runs) == 1) == (consecutive or len(table) == 1)
        spans.append(SeqSpan(row, row + new, ctx, 0, runs, prompt_len))
        xs.append(torch.randn(new, config.hidden_size, generator=g))
        pos_list.append(positions)
        slots.append(slot)
        row += new
    x = torch.cat(xs)
    positions = torch.cat(pos_list)
    meta = AttentionMetadata(spans, torch.cat(slots), align)
    cos, sin = RotaryEmbedding(config).cos_sin(positions, x.dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    got = attn(x, cos, sin, meta, (k_cache, v_cache))
    # the reference reads the cache after the layer wrote the new K/V
    for span, xi, pi, table in zip(spans, xs, pos_list, tables):
        want = _reference(attn, config, xi, span, pi, k_cache, v_cache, table, window)
        torch.testing.assert_close(got[span.q_start:span.q_end], want, atol=1e-5, rtol=1e-5)
    # only the new tokens' slots changed
    changed = (k_cache != k_ref).any(dim=2).any(dim=0).nonzero().flatten().sort().values
    assert changed.tolist() == sorted(torch.cat(slots).tolist())
    del v_ref
    if decode_path is not None:
        # the 3 decode spans; with `align`, (3, 9) adds position 3 (alone up to the alignment
        # at 4) and the 2 recomputed rows past its 10-token prompt
        assert decode_path.rows == 3 + (3 if align else 0)


def _llama_layer(heads, kv_heads, dim, dtype, g):
    """An attention layer of the given head shape, random weights drawn from `g`, in `dtype`."""
    config = tiny_config("llama", num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=dim, hidden_size=min(heads * dim, 256))
    attn = Attention(config, 0)
    for p in attn.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return config, attn.to(dtype)


@pytest.fixture(params=BUILDS)
def isa(request):
    """The kernels of each build (tests/models/kernel_builds.py)."""
    with kernel_build(request.param):
        if native.paged_decode() is None:
            # The kernels must build wherever a compiler is installed (CI has g++).
            assert shutil.which("g++") is None, "g++ is installed but the native kernel failed"
            pytest.skip("no C++ compiler: the native kernels are not built")
        if request.param == "x86-64-v3":
            assert native.decode_simd_width() == 8, "the x86-64-v3 build has no AVX2 path"
        yield request.param


# (compute dtype, KV cache dtype)
DTYPE_PAIRS = [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
               (torch.float32, torch.bfloat16)]
PAIR_IDS = ["bf16", "fp32", "fp32-bf16kv"]


def _tolerance(dtype):
    return 2e-2 if dtype == torch.bfloat16 else 1e-5


def _decode_batch(dtype, kv_dtype, num_kv_heads=3, heads=9, dim=64, seed=3):
    """A layer and a decode step over sequences of different lengths, some of them in several
    runs of slots, in a cache of `kv_dtype`."""
    g = torch.Generator().manual_seed(seed)
    config, attn = _llama_layer(heads, num_kv_heads, dim, dtype, g)
    num_slots = 4096
    k_cache = torch.randn(num_kv_heads, num_slots, dim, generator=g).to(kv_dtype)
    v_cache = torch.randn(num_kv_heads, num_slots, dim, generator=g).to(kv_dtype)
    spans, slots, positions, start = [], [], [], 0
    for row, ctx in enumerate([1, 17, 300, 1029, 64]):
        # the first half of the keys in one run, the rest in another further on
        half = ctx // 2
        runs = [slice(start, start + half), slice(start + 2000, start + 2000 + ctx - half)]
        runs = [r for r in runs if r.stop > r.start]
        spans.append(SeqSpan(row, row + 1, ctx, 0, runs, prompt_len=1))
        slots.append(runs[-1].stop - 1)
        positions.append(ctx - 1)
        start += half + 8
    x = torch.randn(len(spans), config.hidden_size, generator=g).to(dtype)
    cos, sin = RotaryEmbedding(config).cos_sin(torch.tensor(positions), dtype)
    return attn, x, cos, sin, spans, torch.tensor(slots), (k_cache, v_cache)


@pytest.mark.parametrize("dtype,kv_dtype", DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("heads,kv_heads,dim",
                         [(9, 3, 64), (4, 4, 128), (8, 1, 64), (4, 1, 256), (16, 1, 128),
                          (32, 2, 256), (6, 2, 32)],
                         ids=["gqa-64", "mha-128", "mqa8-64", "gemma-256", "mqa16-128",
                              "gqa16-256", "gqa-32"])
def test_native_decode_matches_torch_path_and_is_batch_invariant(dtype, kv_dtype, heads,
                                                                 kv_heads, dim, isa,
                                                                 monkeypatch):
    """Head shapes of the vectorised paths (head_dim 64/128/256, up to 16 query heads per KV
    head) and of the portable one (head_dim 32)."""
    kernel = native.paged_decode()
    group = heads // kv_heads
    path = native.decode_path(dtype, kv_dtype, group, dim)
    if dim == 32:
        assert path == "portable"
    elif isa == "x86-64-v3":
        assert path == "simd"
    elif native.decode_simd_width():
        assert path in ("amx", "avx512", "simd")
        bf16 = (dtype, kv_dtype) == (torch.bfloat16, torch.bfloat16)
        if cpu_info().level == "amx" and bf16 and (heads, kv_heads, dim) == (9, 3, 64):
            assert path == "amx"
    attn, x, cos, sin, spans, slots, cache = _decode_batch(dtype, kv_dtype, kv_heads, heads, dim)
    got = attn(x, cos, sin, AttentionMetadata(spans, slots, align=512), cache)
    with monkeypatch.context() as m:
        m.setattr(native, "paged_decode", lambda: None)
        want = attn(x, cos, sin, AttentionMetadata(spans, slots, align=512), cache)
    tol = _tolerance(dtype)
    scale = want.abs().max().item()
    torch.testing.assert_close(got.float(), want.float(), atol=tol * scale, rtol=tol)
    # The kernel's output for a row is the same bits alone as in the batch (called directly:
    # the fp32 projections around it are not batch-invariant on CPU, see models.layers).
    H, D = attn.num_heads, attn.head_dim
    q = torch.randn(len(spans), H, D, generator=torch.Generator().manual_seed(4)).to(dtype)
    batch = torch.empty_like(q)
    meta = AttentionMetadata(spans, slots, align=512)
    assert attn._native_call(kernel, q, cache, batch, meta.native_plan(None, q.device, False).decode)
    for i, span in enumerate(spans):
        alone = AttentionMetadata([SeqSpan(0, 1, span.context_len, 0, span.kv_slots, 1)],
                                  slots[i : i + 1], align=512)
        one = torch.empty_like(q[i : i + 1])
        assert attn._native_call(kernel, q[i : i + 1], cache, one,
                                 alone.native_plan(None, q.device, False).decode)
        assert torch.equal(one[0], batch[i]), f"row {i} depends on the batch"


@pytest.mark.parametrize("dtype,kv_dtype", DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (6, 2, 128), (8, 1, 64)],
                         ids=["gqa-64", "gqa-128", "mqa8-64"])
def test_native_decode_when_later_keys_dominate(dtype, kv_dtype, heads, kv_heads, dim, isa):
    """Decode rows whose later keys score 12-24 nats above the earlier ones (in two runs of
    slots, the second ending mid-tile): the kernel's running maximum must rise and its sums
    and accumulators be rescaled (the AMX path does so only when a weight would pass 2^8).
    Against softmax in fp32 over the cache's rounded K/V."""
    kernel = native.paged_decode()
    G = heads // kv_heads
    g = torch.Generator().manual_seed(9)
    u = torch.nn.functional.normalize(torch.randn(dim, generator=g), dim=0)
    ctxs = [700, 333, 90]
    q = (torch.randn(len(ctxs), heads, dim, generator=g) + 3 * u).to(dtype)
    k_cache = torch.zeros(kv_heads, 2048, dim).to(kv_dtype)
    v_cache = torch.randn(kv_heads, 2048, dim, generator=g).to(kv_dtype)
    spans, start, want = [], 0, []
    for row, ctx in enumerate(ctxs):
        k = torch.randn(kv_heads, ctx, dim, generator=g)
        for pos, alpha in ((ctx // 4, 32.0), (ctx // 2, 48.0), (ctx - 7, 64.0)):
            k[:, pos] = k[:, pos] * 0.5 + alpha * u
        half = ctx // 2
        runs = [slice(start, start + half), slice(start + half + 40, start + ctx + 40)]
        flat = torch.cat([torch.arange(r.start, r.stop) for r in runs])
        k_cache[:, flat] = k.to(kv_dtype)
        kf = k_cache[:, flat].float().repeat_interleave(G, 0)
        vf = v_cache[:, flat].float().repeat_interleave(G, 0)
        scores = torch.einsum("hd,hkd->hk", q[row].float(), kf) / math.sqrt(dim)
        assert (scores.amax(-1) > 11).float().mean() > 0.5
        want.append(torch.einsum("hk,hkd->hd", scores.softmax(-1), vf))
        spans.append(SeqSpan(row, row + 1, ctx, 0, runs, prompt_len=1))
        start += ctx + 100
    attn = _llama_layer(heads, kv_heads, dim, dtype, g)[1]
    meta = AttentionMetadata(spans, torch.zeros(len(ctxs), dtype=torch.int64), align=512)
    got = torch.zeros_like(q)
    assert attn._native_call(kernel, q, (k_cache, v_cache), got,
                             meta.native_plan(None, q.device, False).decode)
    want = torch.stack(want)
    tol = _tolerance(dtype)
    torch.testing.assert_close(got.float(), want, atol=tol * want.abs().max().item(), rtol=tol)


def test_native_decode_uses_the_avx512_path_where_built():
    if native.paged_decode() is None or native.decode_simd_width() != 16:
        pytest.skip("this CPU or build has no AVX-512 decode path")
    amx = cpu_info().level == "amx"
    for dtype, kv_dtype in DTYPE_PAIRS:
        bf16 = (dtype, kv_dtype) == (torch.bfloat16, torch.bfloat16)
        assert native.decode_path(dtype, kv_dtype, 3, 64) == ("amx" if amx and bf16 else "avx512")
        assert native.decode_path(dtype, kv_dtype, 16, 256) == "simd"  # 16 lanes here
    assert native.decode_path(torch.bfloat16, torch.float32, 3, 64) is None  # not a pair it takes


def test_native_prefill_takes_amx_where_the_cpu_has_it():
    """On a CPU with AMX (and a compiler that knows its intrinsics: g++ 11 and later) bf16
    prefill runs on the AMX library, the fastest there; fp32 on the f32 one."""
    if cpu_info().level != "amx" or native.paged_decode() is None:
        pytest.skip("this CPU (or forced ISA level) has no AMX")
    amx = native.library().get("prefill_attention_amx.cpp")
    assert amx is not None and amx.docpipe_prefill_supported(1, 1, 64, 3), "AMX build unused"
    assert native.prefill_attention(torch.bfloat16, torch.bfloat16, 64, 3) is (
        amx.docpipe_prefill_attention)
    for dim in (128, 256):
        assert native.prefill_attention(torch.bfloat16, torch.bfloat16, dim, 4) is (
            amx.docpipe_prefill_attention)
    assert not amx.docpipe_prefill_supported(1, 1, 32, 3)
    assert not amx.docpipe_prefill_supported(1, 1, 64, 17)
    assert not amx.docpipe_prefill_supported(0, 0, 64, 3)  # fp32: the f32 library's
    f32 = native.library()["prefill_attention_f32.cpp"].docpipe_prefill_attention
    assert native.prefill_attention(torch.float32, torch.float32, 64, 3) is f32


def _prefill_batch(heads, kv_heads, dim, dtype, kv_dtype, seed=5):
    """A layer and a step mixing fresh prompts, prompts after cached keys (in two runs of
    slots), and decodes; block size 16, lengths not multiples of it."""
    g = torch.Generator().manual_seed(seed)
    config, attn = _llama_layer(heads, kv_heads, dim, dtype, g)
    k_cache = torch.randn(kv_heads, 8192, dim, generator=g).to(kv_dtype)
    v_cache = torch.randn(kv_heads, 8192, dim, generator=g).to(kv_dtype)
    # (cached, new, prompt_len); slots: [cached + new] in one run from `start`, or split in two
    cases = [(0, 37, 37), (0, 1, 1), (100, 60, 300), (517, 300, 900), (40, 1, 30), (0, 130, 130)]
    spans, slots, positions, row, start = [], [], [], 0, 0
    for cached, new, prompt_len in cases:
        ctx = cached + new
        half = ctx // 2
        runs = [slice(start, start + half), slice(start + 4000, start + 4000 + ctx - half)]
        runs = [r for r in runs if r.stop > r.start]
        spans.append(SeqSpan(row, row + new, ctx, 0, runs, prompt_len))
        flat = torch.cat([torch.arange(r.start, r.stop) for r in runs])
        slots.append(flat[cached:])
        positions.append(torch.arange(cached, ctx))
        row += new
        start += half + 16
    x = torch.randn(row, config.hidden_size, generator=g).to(dtype)
    pos = torch.cat(positions)
    cos, sin = RotaryEmbedding(config).cos_sin(pos, dtype)
    return attn, x, cos, sin, spans, torch.cat(slots), (k_cache, v_cache)


# What each prefill library computes, for the skip messages (native.PREFILL_SOURCES).
PREFILL_NEEDS = {"prefill_attention_amx.cpp": "bf16 with head_dim 64/128/256 on a CPU with AMX",
                 "prefill_attention.cpp": "bf16 with head_dim 64/128 on AVX-512 BF16",
                 "prefill_attention_f32.cpp": "fp32 queries, head_dim 64/128/256, on AVX2 + FMA"}


@pytest.fixture(params=native.PREFILL_SOURCES,
                ids=[s.removesuffix(".cpp").replace("prefill_attention", "prefill") for s in
                     native.PREFILL_SOURCES])
def prefill_source(request, monkeypatch):
    """One prefill library at a time: `native.prefill_attention` takes the first of
    PREFILL_SOURCES that computes a shape, so without this a CPU would test only the one it
    prefers (an AMX machine: never the AVX-512 BF16 kernel)."""
    monkeypatch.setattr(native, "PREFILL_SOURCES", [request.param])
    return request.param


def _prefill_kernel_or_skip(source, dtype, kv_dtype, dim, group):
    kernel = native.prefill_attention(dtype, kv_dtype, dim, group)
    if kernel is None:
        if source == "prefill_attention_f32.cpp" and dtype == torch.float32 and (
                dim in (64, 128, 256)):
            # fp32 prefill runs on AVX2 + FMA and AVX-512: any x86-64-v3 CPU has it
            assert not cpu_info().is_x86 or cpu_info().level == "baseline", "no fp32 prefill kernel"
        pytest.skip(f"csrc/{source} computes {PREFILL_NEEDS[source]}: not this case or build")
    return kernel


@pytest.mark.parametrize("align", [None, 256], ids=["one-call", "aligned-groups"])
@pytest.mark.parametrize("dtype,kv_dtype", DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("heads,kv_heads,dim",
                         [(9, 3, 64), (4, 4, 128), (8, 1, 64), (4, 1, 256), (16, 1, 128)],
                         ids=["gqa-64", "mha-128", "mqa8-64", "gemma-256", "mqa16-128"])
def test_native_prefill_matches_torch_path_and_is_batch_invariant(heads, kv_heads, dim, dtype,
                                                                  kv_dtype, align, isa,
                                                                  prefill_source, monkeypatch):
    kernel = _prefill_kernel_or_skip(prefill_source, dtype, kv_dtype, dim, heads // kv_heads)
    attn, x, cos, sin, spans, slots, cache = _prefill_batch(heads, kv_heads, dim, dtype, kv_dtype)
    caches = [tuple(c.clone() for c in cache) for _ in range(2)]
    got = attn(x, cos, sin, AttentionMetadata(spans, slots, align), caches[0])
    with monkeypatch.context() as m:
        m.setattr(native, "prefill_attention", lambda *a: None)
        want = attn(x, cos, sin, AttentionMetadata(spans, slots, align), caches[1])
    tol = _tolerance(dtype)
    scale = want.float().abs().max().item()
    torch.testing.assert_close(got.float(), want.float(), atol=tol * scale, rtol=tol)
    # The kernel's rows (called directly, on the cache the layer wrote) are the same bits
    # alone as in the batch.
    H, D = attn.num_heads, attn.head_dim
    q = torch.randn(len(x), H, D, generator=torch.Generator().manual_seed(6)).to(dtype)
    meta = AttentionMetadata(spans, slots, align)
    plan = meta.native_plan(None, q.device, True)
    assert len(plan.prefill[0]) >= 4, "the step should hold several prefill groups"
    batch = torch.zeros_like(q)
    assert attn._native_call(kernel, q, caches[0], batch, plan.prefill)
    for span in spans:
        if span.num_new == 1:
            continue
        alone_span = SeqSpan(0, span.num_new, span.context_len, 0, span.kv_slots, span.prompt_len)
        rows = slice(span.q_start, span.q_end)
        alone = AttentionMetadata([alone_span], slots[rows], align)
        one = torch.zeros_like(q[rows])
        assert attn._native_call(kernel, q[rows], caches[0], one,
                                 alone.native_plan(None, q.device, True).prefill)
        assert torch.equal(one, batch[rows]), f"span at row {span.q_start} depends on the batch"


@pytest.mark.parametrize("dtype,kv_dtype", DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (16, 1)], ids=["gqa", "mqa16"])
@pytest.mark.parametrize("cached", [0, 45])
def test_native_prefill_when_later_keys_dominate(dtype, kv_dtype, heads, kv_heads, cached,
                                                 prefill_source):
    """Keys far into the sequence whose scores exceed everything before them by 12-24 nats:
    the kernels' running maximum must rise and their earlier sums and outputs be rescaled
    (the AMX kernel does so only when a weight would pass 2^8). Against softmax in fp32 over
    the same rounded K/V, and each row the same bits alone."""
    D, G = 64, heads // kv_heads
    kernel = _prefill_kernel_or_skip(prefill_source, dtype, kv_dtype, D, G)
    g = torch.Generator().manual_seed(8)
    new = 300
    ctx = cached + new
    u = torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0)
    q = (torch.randn(new, heads, D, generator=g) + 3 * u).to(dtype)
    k = torch.randn(kv_heads, ctx, D, generator=g)
    for pos, alpha in ((60, 32.0), (170, 48.0), (290, 64.0)):  # scaled scores ~12, 18, 24
        k[:, pos] = k[:, pos] * 0.5 + alpha * u
    v = torch.randn(kv_heads, ctx, D, generator=g)
    # the cache: keys in two runs of slots, behind some unused ones
    k_cache = torch.zeros(kv_heads, ctx + 64, D).to(kv_dtype)
    v_cache = torch.zeros_like(k_cache)
    half = ctx // 2
    runs = [slice(5, 5 + half), slice(40 + half, 40 + ctx)]
    flat = torch.cat([torch.arange(r.start, r.stop) for r in runs])
    k_cache[:, flat], v_cache[:, flat] = k.to(kv_dtype), v.to(kv_dtype)
    # softmax(q k^T / sqrt(D)) v in fp32, causal, over the cache's rounded K/V
    kf = k_cache[:, flat].float().repeat_interleave(G, 0)
    vf = v_cache[:, flat].float().repeat_interleave(G, 0)
    scores = torch.einsum("nhd,hkd->hnk", q.float(), kf) / math.sqrt(D)
    visible = torch.arange(ctx).unsqueeze(0) <= (cached + torch.arange(new)).unsqueeze(1)
    want = torch.einsum("hnk,hkd->nhd", scores.masked_fill(~visible, float("-inf")).softmax(-1), vf)
    assert (scores.masked_fill(~visible, float("-inf")).amax(-1) > 11).float().mean() > 0.5
    attn = _llama_layer(heads, kv_heads, D, dtype, g)[1]
    meta = AttentionMetadata([SeqSpan(0, new, ctx, 0, runs, ctx)], flat[cached:], 256)
    got = torch.zeros_like(q)
    assert attn._native_call(kernel, q, (k_cache, v_cache), got,
                             meta.native_plan(None, q.device, True).prefill)
    tol = _tolerance(dtype)
    torch.testing.assert_close(got.float(), want, atol=tol * want.abs().max().item(), rtol=tol)
    # rows 256.. alone (their own group under align 256) give the same bits
    alone = AttentionMetadata([SeqSpan(0, new - 256, ctx, 0, runs, ctx)], flat[cached + 256:], 256)
    one = torch.zeros_like(q[256:])
    assert attn._native_call(kernel, q[256:], (k_cache, v_cache), one,
                             alone.native_plan(None, q.device, True).prefill)
    assert torch.equal(one, got[256:])
