"""GGUF weights kept packed (models/quant.py, csrc/qmatmul.cpp) against the dequantize-at-load path.

Dequantization (native and torch) is bit-equal to models.gguf's (itself bit-equal to
gguf.quants.dequantize). Matmuls sum in another order than the BLAS, so they are compared
with the fp32 error bound of a K-term dot product computed two ways:

    |y_packed - y_ref| <= 2 * K * 2^-24 * (|x| @ |W|^T)      (elementwise)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import native, quant
from models.cpu import LEVELS, cpu_info
from models.gguf import TENSOR_FORMATS, open_gguf
from models.registry import resolve_model_path

TYPES = sorted(quant.PACKED_TYPES)
# byte offsets of each type's fp16 fields (scales and mins), which must hold finite values
HALF_FIELDS = {2: [0], 3: [0, 2], 6: [0], 7: [0, 2], 8: [0], 12: [0, 2], 13: [0, 2], 14: [208]}
needs_native = pytest.mark.skipif(quant._lib() is None, reason="native qmatmul kernel not built")


# DOCPIPE_CPU_ISA per build the kernel tests run on, and the path each build must take
BUILDS = {"native": ("native", None), "x86-64-v3": ("avx2", "avx2"), "x86-64-v2": ("baseline", "portable")}


@pytest.fixture(params=list(BUILDS))
def build(request, monkeypatch):
    """The qmatmul kernels built for this CPU, for x86-64-v3 (what an AVX2 + FMA machine gets:
    its SIMD dequantizers) and for x86-64-v2 (the portable scalar code), so one machine tests
    all three."""
    level, path = BUILDS[request.param]
    info = cpu_info()
    if level != "native":
        if not info.is_x86:
            pytest.skip("x86 builds")
        if level == "avx2" and LEVELS.index(info.detected_level) < LEVELS.index("avx2"):
            pytest.skip("not an x86 CPU with AVX2 + FMA")
        if level == info.detected_level:
            pytest.skip("the native build is this one")
        monkeypatch.setenv("DOCPIPE_CPU_ISA", level)
    cpu_info.cache_clear()
    native.library.cache_clear()
    try:
        if quant._lib() is None:
            pytest.skip("native qmatmul kernel not built")
        if path is not None:
            assert quant.kernel_path() == path
        yield request.param
    finally:
        monkeypatch.delenv("DOCPIPE_CPU_ISA", raising=False)
        cpu_info.cache_clear()
        native.library.cache_clear()


def random_blocks(ggml_type: int, rows: int, k: int, seed: int = 0) -> torch.Tensor:
    """Random packed rows [rows, row_bytes]: random quants and scales, fp16 fields finite."""
    _, block_size, type_size = quant.PACKED_TYPES[ggml_type]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows * k // block_size, type_size), dtype=np.uint8)
    for at in HALF_FIELDS[ggml_type]:
        halves = (rng.standard_normal(len(blocks)) * 0.01).astype(np.float16)
        blocks[:, at : at + 2] = halves.view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(blocks.reshape(rows, -1))


def reference(ggml_type: int, packed: torch.Tensor, k: int) -> torch.Tensor:
    fmt = TENSOR_FORMATS[ggml_type]
    values = fmt.dequantize(packed.numpy().reshape(-1, fmt.type_size))
    return torch.from_numpy(values.reshape(packed.shape[0], k))


def assert_within_bound(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    ref = x.double() @ w.double().T
    bound = 2 * w.shape[1] * 2.0**-24 * (x.abs().double() @ w.abs().double().T)
    err = (y.double() - ref).abs()
    ref_err = ((x @ w.T).double() - ref).abs()  # the dequantized path's own error
    assert bool((err <= bound + ref_err).all()), f"max excess {(err - bound - ref_err).max()}"


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: quant.PACKED_TYPES[t][0])
def test_dequantize_rows_bit_equal(ggml_type, build):
    k = 512
    packed = random_blocks(ggml_type, 37, k)
    ref = reference(ggml_type, packed, k)
    blocks = packed.reshape(-1, quant.PACKED_TYPES[ggml_type][2])
    torch_values = quant._TORCH_DEQUANT[ggml_type](blocks).reshape(37, k)
    assert torch.equal(torch_values, ref)
    if quant._lib() is not None:
        assert torch.equal(quant.dequantize_rows(ggml_type, packed, k), ref)
        bf16 = quant.dequantize_rows(ggml_type, packed, k, torch.bfloat16)
        assert torch.equal(bf16, ref.to(torch.bfloat16))


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: quant.PACKED_TYPES[t][0])
@pytest.mark.parametrize("m", [1, 3, 8, 16, 40])
def test_matmul_random_weights(ggml_type, m, build):
    k = 768 if quant.PACKED_TYPES[ggml_type][1] == 256 else 896  # 896: not whole 256-blocks
    n = 70
    packed = random_blocks(ggml_type, n, k, seed=m)
    w = reference(ggml_type, packed, k)
    weight = quant.PackedWeight([(ggml_type, packed)], k, torch.float32)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    assert_within_bound(weight.matmul(x), x, w)


@pytest.mark.parametrize("fixed_k", [False, True])
def test_matmul_of_no_rows(fixed_k, build):
    """A step whose rows are all mid-prefill asks the packed lm_head for the logits of no
    rows: an empty [0, N] result, not an error."""
    packed = random_blocks(3, 8, 64)
    weight = quant.PackedWeight([(3, packed)], 64, torch.float32)
    y = weight.matmul(torch.empty(0, 64), fixed_k=fixed_k)
    assert y.shape == (0, 8)


@needs_native
def test_fused_segments_and_bf16():
    """A fused weight of three types (as a Q4_K_M qkv), fp32 and bf16 activations."""
    k = 512
    parts = [(12, random_blocks(12, 64, k, 1)), (6, random_blocks(6, 16, k, 2)),
             (14, random_blocks(14, 16, k, 3))]
    w = torch.cat([reference(t, p, k) for t, p in parts])
    weight = quant.PackedWeight(parts, k, torch.float32)
    assert torch.equal(weight.dequantize(), w)
    for m in (2, 33):
        x = torch.randn(m, k)
        assert_within_bound(weight.matmul(x), x, w)
        # bf16: weights (prefill tiles) and outputs rounded to bf16, 2^-9 relative each
        xb = x.to(torch.bfloat16)
        err = (weight.matmul(xb).float() - xb.float() @ w.T).abs()
        assert bool((err <= 2.0**-7 * (xb.float().abs() @ w.abs().T) + 1e-6).all())
    ids = torch.tensor([0, 70, 95, 3])
    assert torch.equal(weight[ids], w[ids])


def test_torch_fallback(monkeypatch):
    """Without the native kernels (and on CUDA) tiles are dequantized with torch ops."""
    k = 512
    packed = random_blocks(14, 48, k)
    w = reference(14, packed, k)
    monkeypatch.setattr(quant, "_lib", lambda: None)
    monkeypatch.setattr(quant, "TILE_ELEMENTS", 20 * k)  # several tiles
    weight = quant.PackedWeight([(14, packed)], k, torch.float32)
    for m in (1, 20):
        x = torch.randn(m, k)
        assert_within_bound(weight.matmul(x), x, w)


@needs_native
def test_fixed_k_rows_do_not_depend_on_row_count():
    k = 512
    packed = random_blocks(8, 40, k)
    weight = quant.PackedWeight([(8, packed)], k, torch.float32)
    x = torch.randn(45, k)
    full = weight.matmul(x, fixed_k=True)
    for r in (0, 17, 44):
        assert torch.equal(weight.matmul(x[r : r + 1], fixed_k=True)[0], full[r])


def _file(name: str):
    try:
        path = resolve_model_path(name)
    except Exception:
        return None
    return path if path.is_file() else None


@needs_native
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])
def test_real_tensors(name):
    """One tensor of each packable type of the file: dequantized bit-equal to
    gguf.quants.dequantize, matmul within the bound."""
    gguf_quants = pytest.importorskip("gguf.quants")
    path = _file(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    gguf_file = open_gguf(path)
    seen = set()
    for info in gguf_file.tensors.values():
        if info.ggml_type in seen or not quant.packable(info.ggml_type, info.shape):
            continue
        seen.add(info.ggml_type)
        rows = min(info.shape[0], 256)
        packed = torch.from_numpy(np.array(quant.packed_rows(
            gguf_file.buffer, info.offset, info.ggml_type, info.shape)[:rows]))
        k = info.shape[1]
        ref = torch.from_numpy(np.asarray(
            gguf_quants.dequantize(packed.numpy(), info.ggml_type), np.float32).reshape(rows, k))
        assert torch.equal(quant.dequantize_rows(info.ggml_type, packed, k), ref), info.name
        weight = quant.PackedWeight([(info.ggml_type, packed)], k, torch.float32)
        x = torch.randn(8, k)
        assert_within_bound(weight.matmul(x), x, ref)
    assert seen, f"{name}: no packable tensors"


@pytest.fixture(scope="module")
def smollm2_pair():
    if _file("smollm2-135m-instruct") is None or quant._lib() is None:
        pytest.skip("SmolLM2 not installed or no native kernels")
    from models.loading import load_model

    packed = load_model("smollm2-135m-instruct", dtype="float32", quantization="gguf")
    dense = load_model("smollm2-135m-instruct", dtype="float32", quantization="none")
    return packed, dense


def test_smollm2_packed_memory_and_logits(smollm2_pair):
    packed, dense = smollm2_pair
    file_bytes = resolve_model_path("smollm2-135m-instruct").stat().st_size
    assert quant.packed_bytes(packed.model) <= file_bytes
    assert isinstance(packed.model.embed_tokens, quant.PackedWeight)
    ids = torch.tensor([[1, 504, 3458, 314, 4044, 30, 2]])
    diff = (packed.model.logits_dense(ids) - dense.model.logits_dense(ids)).abs().max()
    assert diff < 5e-3, diff  # 7 rows: the decode kernel; measured 6.6e-4 on logits up to 32
    long_ids = ids.repeat(1, 5)  # 35 rows: tiles + BLAS, the same sums as the dense path
    diff = (packed.model.logits_dense(long_ids) - dense.model.logits_dense(long_ids)).abs().max()
    assert diff < 5e-3, diff


def test_smollm2_greedy_equal(smollm2_pair):
    from models import LLM, SamplingParams

    packed, dense = smollm2_pair
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time",
               "List three colors:"]
    sp = SamplingParams(max_tokens=24, temperature=0.0)
    got = LLM(packed, max_num_seqs=4).generate(prompts, sp)
    want = LLM(dense, max_num_seqs=4).generate(prompts, sp)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


def test_batch_invariant_engines_load_gguf_dequantized(smollm2_gguf):
    """"auto" keeps GGUF weights packed, except for batch-invariant engines (the pipeline's),
    whose fixed-row kernel makes packed prefill slower."""
    from models import LLM
    from models.quant import PackedWeight, engine_quantization

    assert engine_quantization("auto", True) == "none"
    assert engine_quantization("auto", False) == "auto"
    assert engine_quantization("gguf", True) == "gguf"

    def packed(llm) -> bool:
        return any(isinstance(m, PackedWeight) for m in llm.engine.model.modules())

    assert packed(LLM(str(smollm2_gguf), dtype="float32", max_num_seqs=4))
    assert not packed(LLM(str(smollm2_gguf), dtype="float32", batch_invariant=True, max_num_seqs=4))


needs_amx = pytest.mark.skipif(quant._lib() is None or quant.amx_max_rows() == 0,
                               reason="no AMX qmatmul path on this CPU or build")


@needs_amx
@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: quant.PACKED_TYPES[t][0])
def test_amx_matmul_is_bf16_weights_with_fp32_sums(ggml_type, monkeypatch):
    """The AMX path (bf16 x, up to amx_max_rows() rows) computes x @ W.to(bf16)^T: one-hot
    rows of x read single weights back exactly (dequantization, rounding and layout), random
    rows are within fp32 summation plus one bf16 rounding of the result, and a row's value
    does not depend on how many rows come with it. 70 rows of W: two blocks of 32 and a tail."""
    k = 768 if quant.PACKED_TYPES[ggml_type][1] == 256 else 896
    n = 70
    packed = random_blocks(ggml_type, n, k, seed=5)
    w = reference(ggml_type, packed, k).to(torch.bfloat16)
    weight = quant.PackedWeight([(ggml_type, packed)], k, torch.bfloat16)
    lib = quant._lib()
    calls = []

    class Counting:  # counts the AMX calls that matmul makes
        def __getattr__(self, name):
            fn = getattr(lib, name)
            if name != "docpipe_qmatmul_amx":
                return fn
            return lambda *a: calls.append(a[6]) or fn(*a)

    monkeypatch.setattr(quant, "_lib", lambda: Counting())
    cols = torch.tensor([0, 1, 31, 32, 33, 255, 256, 257, 511, k - 33, k - 2, k - 1])
    onehot = torch.zeros(len(cols), k, dtype=torch.bfloat16)
    onehot[torch.arange(len(cols)), cols] = 1
    assert torch.equal(weight.matmul(onehot), w[:, cols].T)

    g = torch.Generator().manual_seed(ggml_type)
    x = torch.randn(quant.amx_max_rows(), k, generator=g).to(torch.bfloat16)
    full = weight.matmul(x)
    ref = x.double() @ w.double().T
    bound = 2.0**-8 * ref.abs() + 2 * k * 2.0**-24 * (x.double().abs() @ w.double().abs().T)
    assert bool(((full.double() - ref).abs() <= bound).all())
    for m in (1, 15, 16, 17, 40):
        assert torch.equal(weight.matmul(x[:m]), full[:m])
    assert torch.equal(weight.matmul(x[37:38]), full[37:38])
    assert calls == [len(cols), quant.amx_max_rows(), 1, 15, 16, 17, 40, 1]
