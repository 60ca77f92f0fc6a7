"""GGUF weights kept packed: linear layers and embeddings that hold llama.cpp's quantized blocks.

`PackedWeight` is an [N, K] matrix stored as row segments, each a uint8 tensor [rows, K /
block_size * type_size] of one ggml type (a fused qkv or gate|up projection stacks its parts'
rows, and a Q4_K_M file may give q, k and v different types). Rows are whole GGUF rows, so
a row permutation (llama's q/k un-permute) permutes packed rows.

    y = x W^T, x [M, K]:
      CPU with AMX, bf16 x, M <= 256          csrc/qmatmul.cpp's AMX path: blocks of 32 rows
      (decode steps of many sequences)        dequantized to bf16 in L1/L2 and multiplied on
                                              the tile unit, W read once; the values of x @
                                              W.to(bf16)^T with fp32 sums (as the BLAS path)
      CPU, native kernels, M <= 16 (decode)   csrc/qmatmul.cpp: blocks dequantized in L1 and
                                              FMA'd into fp32 accumulators, W read once
      CPU, M > 16 (prefill)                   tiles of TILE_ELEMENTS dequantized to x's dtype
                                              (native), one BLAS matmul per tile
      fixed_k (batch-invariant runs)          the native kernel for every M (16 rows at a time,
                                              one call): a row's value never depends on M
      CUDA, or no native kernels              tiles dequantized with torch ops, then matmul

Dequantized values are bit-equal to models/gguf.py's (the products are exact in fp32), so the
only difference from the dequantize-at-load path is the order of the fp32 sums in the decode
kernel: |y - y_ref| <= K * 2^-23 * sum_k |x_k w_k| per output (in practice far less).
"""

from __future__ import annotations

import ctypes
import logging
import math

import numpy as np
import torch
from torch import nn

from models import native

logger = logging.getLogger(__name__)

# ggml type id -> (name, block_size, type_size): the types kept packed (native kernel and torch
# dequantizer both exist). Others are dequantized at load.
PACKED_TYPES: dict[int, tuple[str, int, int]] = {
    2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
}
# Rows up to this count go through the native decode kernel (its compile-time maximum).
MAX_KERNEL_ROWS = 16
# Values of W dequantized at a time on the prefill path (16 MiB of fp32): few tiles per layer,
# since every tile is two thread wake-ups (dequantize, BLAS), slow on a busy machine.
TILE_ELEMENTS = 1 << 22


def _lib() -> ctypes.CDLL | None:
    return native.library().get("qmatmul.cpp")


def kernel_path() -> str | None:
    """The native kernel's code path ("avx512", "avx2", "portable"), None without it."""
    lib = _lib()
    return None if lib is None else {2: "avx512", 1: "avx2", 0: "portable"}[lib.docpipe_qmatmul_path()]


def amx_max_rows() -> int:
    """Most rows of bf16 x the AMX matmul takes: 0 without AMX (CPU, OS grant or build)."""
    lib = _lib()
    return 0 if lib is None else lib.docpipe_qmatmul_amx_max_rows()


# -- torch dequantizers (any device) --------------------------------------------------------
def _f16(b: torch.Tensor, at: int) -> torch.Tensor:
    return b[:, at : at + 2].contiguous().view(torch.float16).float()  # [N, 1]


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    return torch.cat([q & 15, q >> 4], dim=1)


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """[N, 4] bytes -> [N, 32] bits, bit j of the little-endian u32 for element j."""
    idx = torch.arange(32, device=qh.device)
    return (qh[:, idx // 8] >> (idx % 8).to(torch.uint8)) & 1


def _k_scale_mins(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    low, high, tail = p[:, 0:4], p[:, 4:8], p[:, 8:12]
    scales = torch.cat([low & 63, (tail & 15) | ((low >> 6) << 4)], dim=1)
    mins = torch.cat([high & 63, (tail >> 4) | ((high >> 6) << 4)], dim=1)
    return scales.float(), mins.float()


def _k_dequant(b, q, scales, mins=None):
    n, s = q.shape[0], scales.shape[1]
    out = (_f16(b, 0) * scales).reshape(n, s, 1) * q.reshape(n, s, -1)
    if mins is not None:
        out = out - (_f16(b, 2) * mins).reshape(n, s, 1)
    return out.reshape(n, 256)


def _dq_q4_0(b):
    return _f16(b, 0) * (_nibbles(b[:, 2:]).float() - 8.0)


def _dq_q4_1(b):
    return _f16(b, 0) * _nibbles(b[:, 4:]).float() + _f16(b, 2)


def _dq_q5_0(b):
    return _f16(b, 0) * ((_nibbles(b[:, 6:]) | (_fifth_bits(b[:, 2:6]) << 4)).float() - 16.0)


def _dq_q5_1(b):
    return _f16(b, 0) * (_nibbles(b[:, 8:]) | (_fifth_bits(b[:, 4:8]) << 4)).float() + _f16(b, 2)


def _dq_q8_0(b):
    return _f16(b, 0) * b[:, 2:].contiguous().view(torch.int8).float()


def _dq_q4_k(b):
    n = b.shape[0]
    packed = b[:, 16:144].reshape(n, 4, 1, 32)
    shifts = torch.tensor([0, 4], dtype=torch.uint8, device=b.device).reshape(1, 1, 2, 1)
    q = ((packed >> shifts) & 15).float()
    scales, mins = _k_scale_mins(b[:, 4:16])
    return _k_dequant(b, q, scales, mins)


def _dq_q5_k(b):
    n = b.shape[0]
    packed = b[:, 48:176].reshape(n, 4, 1, 32)
    shifts = torch.tensor([0, 4], dtype=torch.uint8, device=b.device).reshape(1, 1, 2, 1)
    low = ((packed >> shifts) & 15).reshape(n, 8, 32)
    bits = torch.arange(8, dtype=torch.uint8, device=b.device).reshape(1, 8, 1)
    high = (b[:, 16:48].reshape(n, 1, 32) >> bits) & 1
    scales, mins = _k_scale_mins(b[:, 4:16])
    return _k_dequant(b, low.float() + 16.0 * high.float(), scales, mins)


def _dq_q6_k(b):
    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 1, 2, 32)
    nib = torch.tensor([0, 4], dtype=torch.uint8, device=b.device).reshape(1, 1, 2, 1, 1)
    low = ((ql >> nib) & 15).reshape(n, 2, 4, 32)
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).reshape(1, 1, 4, 1)
    high = (qh >> shifts) & 3
    q = (low | (high << 4)).float().reshape(n, 16, 16) - 32.0
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = b[:, 208:210].contiguous().view(torch.float16).float()
    return ((d * scales).reshape(n, 16, 1) * q).reshape(n, 256)


_TORCH_DEQUANT = {2: _dq_q4_0, 3: _dq_q4_1, 6: _dq_q5_0, 7: _dq_q5_1, 8: _dq_q8_0,
                  12: _dq_q4_k, 13: _dq_q5_k, 14: _dq_q6_k}


def dequantize_rows(ggml_type: int, packed: torch.Tensor, k: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed rows [R, row_bytes] uint8 -> [R, k] in `dtype` (native kernel on CPU, else torch
    ops on the tensor's device); values bit-equal to models.gguf's dequantizers."""
    rows = packed.shape[0]
    lib = _lib()
    if (lib is not None and packed.device.type == "cpu" and dtype in native.DTYPES
            and packed.is_contiguous()):
        out = torch.empty(rows, k, dtype=dtype)
        rc = lib.docpipe_dequantize_rows(ggml_type, native.DTYPES[dtype], packed.data_ptr(), rows,
                                         k, out.data_ptr())
        assert rc == 0, f"docpipe_dequantize_rows refused type {ggml_type}, k {k}"
        return out
    _, block_size, type_size = PACKED_TYPES[ggml_type]
    blocks = packed.reshape(-1, type_size)
    return _TORCH_DEQUANT[ggml_type](blocks).reshape(rows, k).to(dtype)


class PackedWeight(nn.Module):
    """An [N, K] weight kept as GGUF blocks: row segments (ggml type, uint8 [rows, row_bytes])
    stacked in order, registered as buffers (so `.to(device)` moves them). Rows are whole GGUF
    rows; every segment's K is a multiple of its block size. Used as a linear weight
    (`matmul`) and as an embedding table (`weight[ids]`)."""

    def __init__(self, segments: list[tuple[int, torch.Tensor]], in_features: int,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features = in_features
        self.compute_dtype = dtype  # what matmul returns and rows are dequantized to
        self.types: list[int] = []
        self.offsets: list[int] = [0]
        for i, (ggml_type, packed) in enumerate(segments):
            _, block_size, type_size = PACKED_TYPES[ggml_type]
            assert in_features % block_size == 0 and packed.dtype == torch.uint8, (
                f"segment {i}: {PACKED_TYPES[ggml_type][0]} rows of {in_features} values: "
                "not whole blocks")
            assert packed.shape[1] == in_features // block_size * type_size, (
                f"segment {i}: {packed.shape[1]} bytes per row, not {in_features} values")
            self.register_buffer(f"packed{i}", packed.contiguous(), persistent=False)
            self.types.append(ggml_type)
            self.offsets.append(self.offsets[-1] + packed.shape[0])
        self.out_features = self.offsets[-1]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype

    @property
    def device(self) -> torch.device:
        return self.packed0.device

    def segments(self):
        for i, ggml_type in enumerate(self.types):
            yield ggml_type, getattr(self, f"packed{i}"), self.offsets[i], self.offsets[i + 1]

    def nbytes(self) -> int:
        return sum(p.numel() for _, p, _, _ in self.segments())

    def numel(self) -> int:
        """Values of the [N, K] weight, as a dense tensor's numel (parameter counts)."""
        return self.out_features * self.in_features

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole [N, K] weight (tests, references)."""
        return torch.cat([dequantize_rows(t, p, self.in_features, dtype or self.dtype)
                          for t, p, _, _ in self.segments()])

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding lookup: rows `ids` [T] -> [T, K] in the compute dtype."""
        ids = ids.reshape(-1)
        out = torch.empty(ids.numel(), self.in_features, dtype=self.dtype, device=ids.device)
        for ggml_type, packed, lo, hi in self.segments():
            if len(self.types) == 1:
                return dequantize_rows(ggml_type, packed[ids], self.in_features, self.dtype)
            sel = (ids >= lo) & (ids < hi)
            if bool(sel.any()):
                rows = packed[ids[sel] - lo]
                out[sel] = dequantize_rows(ggml_type, rows, self.in_features, self.dtype)
        return out

    def matmul(self, x: torch.Tensor, fixed_k: bool = False) -> torch.Tensor:
        """x [M, K] @ W^T -> [M, N] in x's dtype (see the module docstring for the paths)."""
        assert x.dim() == 2 and x.shape[1] == self.in_features, (
            f"x {tuple(x.shape)} against a packed [{self.out_features}, {self.in_features}] weight")
        m = x.shape[0]
        out = torch.empty(m, self.out_features, dtype=x.dtype, device=x.device)
        if m == 0:  # e.g. the logits of a step whose rows are all mid-prefill
            return out
        lib = _lib()
        kernel = None
        if (not fixed_k and x.dtype == torch.bfloat16 and x.device.type == "cpu"
                and m <= amx_max_rows()):
            kernel = lib.docpipe_qmatmul_amx
        elif (lib is not None and x.device.type == "cpu" and x.dtype in native.DTYPES
              and (m <= MAX_KERNEL_ROWS or fixed_k)):
            dtype_code = native.DTYPES[x.dtype]
            kernel = lambda t, *args: lib.docpipe_qmatmul(t, dtype_code, *args)  # noqa: E731
        if kernel is not None:
            x = x.contiguous()
            for ggml_type, packed, lo, hi in self.segments():
                # output columns [lo, hi) of each row: y's row stride is out_features; the
                # kernels take all of x's rows in one call
                rc = kernel(ggml_type, packed.data_ptr(), hi - lo, self.in_features,
                            x.data_ptr(), x.stride(0), m, out[0, lo:].data_ptr(), out.stride(0))
                assert rc == 0, f"the packed matmul kernel refused type {ggml_type}"
            return out
        tile_rows = max(1, TILE_ELEMENTS // self.in_features)
        segments = list(self.segments())
        if len(segments) == 1 and segments[0][3] <= tile_rows:
            # one tile is the whole weight: the BLAS writes y itself (no copy of a tile's
            # product into a column slice of y)
            ggml_type, packed, _, _ = segments[0]
            tile = dequantize_rows(ggml_type, packed, self.in_features, x.dtype)
            return torch.mm(x, tile.T, out=out)
        for ggml_type, packed, lo, hi in segments:
            for r0 in range(0, hi - lo, tile_rows):
                r1 = min(hi - lo, r0 + tile_rows)
                tile = dequantize_rows(ggml_type, packed[r0:r1], self.in_features, x.dtype)
                out[:, lo + r0 : lo + r1] = x @ tile.T
        return out


class PackedLinear(nn.Module):
    """`y = x @ W.T (+ b)` with W a `PackedWeight`; the drop-in for `layers.Linear`."""

    def __init__(self, weight: PackedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = weight
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(
            bias, requires_grad=False)

    def forward(self, x: torch.Tensor, fixed_k: bool = False) -> torch.Tensor:
        y = self.weight.matmul(x, fixed_k)
        return y if self.bias is None else y + self.bias


def packed_bytes(model: nn.Module) -> int:
    """Bytes of packed GGUF blocks a model holds."""
    return sum(m.nbytes() for m in model.modules() if isinstance(m, PackedWeight))


def packable(ggml_type: int, shape: tuple[int, ...]) -> bool:
    """True when a GGUF tensor of this type and torch-order shape can be kept packed."""
    if ggml_type not in PACKED_TYPES or len(shape) != 2:
        return False
    return shape[1] % PACKED_TYPES[ggml_type][1] == 0


def packed_rows(buffer, offset: int, ggml_type: int, shape: tuple[int, int]) -> np.ndarray:
    """A GGUF tensor's blocks as a read-only uint8 array [rows, row_bytes] over `buffer`."""
    _, block_size, type_size = PACKED_TYPES[ggml_type]
    rows, cols = shape
    row_bytes = cols // block_size * type_size
    return np.frombuffer(buffer, np.uint8, rows * row_bytes, offset).reshape(rows, row_bytes)


def pack_gguf_weights(model: nn.Module, path, hf_config: dict, dtype: torch.dtype):
    """Replace `model`'s linear layers (and its embedding table, and MoE experts) whose GGUF
    tensors are of a PACKED_TYPES type by packed ones holding the file's blocks; returns the
    iterator of the other HF-named tensors, dequantized as `models.gguf.iter_gguf_tensors`
    yields them, for `load_state_dict`. A fused layer is packed only when all its parts are
    packable, a layer's experts only when all of them are (then `mlp.w13` / `mlp.w2` become
    lists of per-expert PackedWeights, which the MoE block indexes as it indexes the dense
    [E, N, K] parameters); other types (F32/F16, Q2_K, Q3_K, ...) are dequantized at load,
    and the log line says so."""
    from models import gguf
    from models.loading import _PART_INDEX, _rename

    gguf_file = gguf.open_gguf(path)
    _, family = gguf._architecture(gguf_file)
    tensor_map = gguf._tensor_map(family.model_type)
    num_layers = hf_config["num_hidden_layers"]
    num_experts = gguf._num_experts(hf_config)
    # (docpipe parameter, expert or None) -> part index -> (ggml type, rows, GGUF name)
    plan: dict[tuple[str, str | None], dict[int, tuple[int, np.ndarray, str]]] = {}
    unpacked: dict[str, int] = {}
    for name, info in gguf_file.tensors.items():
        template, layer, expert = gguf._template(name)
        entry = tensor_map.get(template)
        if entry is None or (layer is not None and int(layer) >= num_layers):
            continue
        stacked = "{e}" in entry[0] and expert is None  # [E, rows, cols]
        if stacked and (len(info.shape) != 3 or info.shape[0] != num_experts):
            continue  # the dequantizing path raises the error that names it
        targets = []
        for e in range(num_experts) if stacked else [expert]:
            renamed = _rename(entry[0].format(i=layer or "", e=e))
            if renamed is None:
                continue
            groups, target = renamed
            if not (target.endswith(("_proj.weight", ".mlp.w13", ".mlp.w2"))
                    or target in ("lm_head.weight", "embed_tokens")):
                continue
            if target == "lm_head.weight" and getattr(model, "lm_head", None) is None:
                continue
            targets.append((groups, target, None if e is None else str(e)))
        if not targets:
            continue
        shape = info.shape[1:] if stacked else info.shape
        if not packable(info.ggml_type, shape):
            type_name = gguf._type_name(info.ggml_type)
            unpacked[type_name] = unpacked.get(type_name, 0) + 1
            continue
        _, block_size, type_size = PACKED_TYPES[info.ggml_type]
        if info.offset + info.num_elements // block_size * type_size > len(gguf_file.buffer):
            continue  # truncated: the dequantizing reader raises the error that names it
        rows = packed_rows(gguf_file.buffer, info.offset, info.ggml_type,
                           (math.prod(info.shape[:-1]), info.shape[-1]))
        heads_field = entry[1]
        if heads_field is not None and family.permuted_rotary:
            rows = gguf.unpermute_rotary_rows(rows, hf_config[heads_field])
        for groups, target, e in targets:
            part = groups.get("part")
            expert_rows = rows[int(e) * shape[0] : (int(e) + 1) * shape[0]] if stacked else rows
            plan.setdefault((target, e), {})[_PART_INDEX[part] if part else 0] = (
                info.ggml_type, expert_rows, name)

    packed_names: set[str] = set()
    experts: dict[str, dict[int, dict[int, tuple[int, np.ndarray, str]]]] = {}
    for (target, e), parts in plan.items():
        if e is not None:
            experts.setdefault(target, {})[int(e)] = parts
            continue
        is_embedding = target == "embed_tokens"
        module_name = target.removesuffix(".weight")
        if is_embedding:
            dense = model.embed_tokens
        else:
            module = model.get_submodule(module_name)
            dense = module.weight
        expected = 3 if ".qkv_proj." in target else 2 if ".gate_up_proj." in target else 1
        weight = _packed_weight(parts, expected, dense, dtype)
        if weight is None:
            continue
        if is_embedding:
            del model.embed_tokens  # a Parameter: unregister it before a module takes the name
            model.embed_tokens = weight
        else:
            parent_name, _, child = module_name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, PackedLinear(weight, module.bias))
        packed_names.update(name for _, _, name in parts.values())
    for target, by_expert in experts.items():
        parent_name, _, child = target.rpartition(".")
        parent = model.get_submodule(parent_name)
        dense = getattr(parent, child, None)
        if not isinstance(dense, torch.Tensor) or sorted(by_expert) != list(range(dense.shape[0])):
            continue
        expected = 2 if child == "w13" else 1
        weights = [_packed_weight(by_expert[e], expected, dense[e], dtype) for e in sorted(by_expert)]
        if any(w is None for w in weights):
            continue
        delattr(parent, child)  # the [E, N, K] Parameter
        setattr(parent, child, nn.ModuleList(weights))
        packed_names.update(name for parts in by_expert.values() for _, _, name in parts.values())
    logger.info("%s: %d tensors kept packed (%.1f MiB)%s", path, len(packed_names),
                packed_bytes(model) / 2**20,
                "; dequantized at load: " + ", ".join(f"{n} {t}" for t, n in unpacked.items())
                if unpacked else "")
    rest = gguf.GGUFFile(gguf_file.path, gguf_file.metadata,
                         {n: i for n, i in gguf_file.tensors.items() if n not in packed_names},
                         gguf_file.buffer)
    return gguf._hf_tensors(rest, hf_config, dtype)


def _packed_weight(parts: dict[int, tuple[int, np.ndarray, str]], expected: int,
                   dense: torch.Tensor, dtype: torch.dtype) -> PackedWeight | None:
    """The PackedWeight of a dense [N, K] weight from its `expected` parts (row blocks in part
    order), or None when a part is missing or the rows do not add up (the dequantizing path
    then raises the error that names the tensor)."""
    if len(parts) != expected or not isinstance(dense, torch.Tensor):
        return None
    ordered = [parts[i] for i in range(expected)]
    if sum(r.shape[0] for _, r, _ in ordered) != dense.shape[0]:
        return None
    segments: list[tuple[int, list[np.ndarray]]] = []
    for ggml_type, rows, _ in ordered:  # merge neighbouring parts of one type
        if segments and segments[-1][0] == ggml_type:
            segments[-1][1].append(rows)
        else:
            segments.append((ggml_type, [rows]))
    return PackedWeight(
        [(t, torch.from_numpy(np.concatenate(rs)).to(dense.device)) for t, rs in segments],
        dense.shape[1], dtype)


QUANTIZATIONS = ("auto", "gguf", "none")


def engine_quantization(quantization: str, batch_invariant: bool) -> str:
    """The quantization an engine loads with: "auto" under batch invariance is "none". A
    batch-invariant engine sends every row count through the fixed-row decode kernel, and
    then prefill is slower packed: a 2048-token SmolLM2 prefill took 11.4 s packed against
    4.9 s dequantized (bf16, this project's Zen 4, measured under load). docpipe's pipeline
    always runs batch-invariant and is mostly prefill."""
    return "none" if quantization == "auto" and batch_invariant else quantization


def resolve_quantization(quantization: str, path, device: str | torch.device) -> str:
    """"gguf" or "none" for a GGUF file. "auto": packed on CPU when the native kernels built,
    else dequantized at load (CUDA: the torch fallback dequantizes every tile each step).
    Measured by benchmarks/packed.py on Qwen2.5-Coder-0.5B Q4_K_M, fp32: weights 0.19x,
    decode at 8 sequences 1.20x (AVX-512) and 2.49x (AVX2) the dequantized path. Prefill
    dequantizes a tile per weight each forward: SmolLM2's 2048-row gate_up takes 40 ms packed
    against 39 ms dequantized at load under AVX2 (before the single-tile torch.mm: 50 ms)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
    if quantization != "auto":
        return quantization
    return "gguf" if torch.device(device).type == "cpu" and _lib() is not None else "none"
