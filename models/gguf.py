"""Read GGUF checkpoints (llama.cpp's one-file format) as an HF config dict and HF-named tensors.

File layout (little-endian), parsed here straight from a memory map:

    magic "GGUF" | u32 version | u64 num_tensors | u64 num_kv
    num_kv      x (string key, u32 value type, value)
    num_tensors x (string name, u32 num_dims, u64 dims[num_dims] innermost first, u32 type,
                   u64 offset)
    padding to `general.alignment` (32) | tensor data (offsets are relative to its start)

Only the metadata is decoded up front; a tensor's bytes are read (and dequantized into a fresh
array) when it is loaded, so nothing is copied beyond what dequantization needs.
"""

from __future__ import annotations

import logging
import math
import mmap
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.errors import ModelLoadError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GGUFArchitecture:
    model_type: str  # HF config.json model_type
    hf_class: str  # HF `architectures` entry
    permuted_rotary: bool  # llama.cpp's converter reordered q/k rows (llama only)
    is_moe: bool = False
    # llama.cpp's converter stores gemma's RMSNorm weights w as 1 + w (its kernels multiply by
    # the stored weight); subtracted again here, since the model scales by (1 + w) as in HF.
    norm_shift: float = 0.0


# general.architecture -> how its files map onto HF. llama.cpp permutes q/k rows only for
# llama-family conversions; its Qwen converters write the HF rows as they are.
GGUF_ARCHITECTURES: dict[str, GGUFArchitecture] = {
    "llama": GGUFArchitecture("llama", "LlamaForCausalLM", permuted_rotary=True),
    "qwen2": GGUFArchitecture("qwen2", "Qwen2ForCausalLM", permuted_rotary=False),
    "qwen2moe": GGUFArchitecture("qwen2_moe", "Qwen2MoeForCausalLM", False, is_moe=True),
    "qwen3": GGUFArchitecture("qwen3", "Qwen3ForCausalLM", permuted_rotary=False),
    "qwen3moe": GGUFArchitecture("qwen3_moe", "Qwen3MoeForCausalLM", False, is_moe=True),
    "gemma3": GGUFArchitecture("gemma3_text", "Gemma3ForCausalLM", False, norm_shift=1.0),
}
SUPPORTED_GGUF_ARCHITECTURES = tuple(GGUF_ARCHITECTURES)
# llama.cpp writes Mixtral as a llama file with `llama.expert_count` set: same q/k row order,
# experts beside the attention (merged [E, ...] tensors, or one per expert in older files).
MIXTRAL = GGUFArchitecture("mixtral", "MixtralForCausalLM", permuted_rotary=True, is_moe=True)

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
_FIX_REDOWNLOAD = "re-download or re-convert the file"

# GGUF metadata value types.
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                   10: "<Q", 11: "<q", 12: "<d"}
_NUMPY_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
                 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


# -- dequantization -------------------------------------------------------------------------
# Each function maps blocks [N, type_size] uint8 -> values [N, block_size] float32.
def _f32(blocks: np.ndarray) -> np.ndarray:
    return blocks.view("<f4").astype(np.float32)  # astype copies: the result is writable


def _f16(blocks: np.ndarray) -> np.ndarray:
    return blocks.view("<f2").astype(np.float32)


def _bf16(blocks: np.ndarray) -> np.ndarray:
    # bfloat16 is the top half of a float32.
    return (blocks.view("<u2").astype(np.uint32) << 16).view(np.float32)


def _scale(blocks: np.ndarray, start: int) -> np.ndarray:
    """The fp16 scalar at byte `start` of every block, as an fp32 column [N, 1]."""
    return blocks[:, start : start + 2].view("<f2").astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """[N, 16] bytes -> [N, 32] 4-bit values: low nibbles are elements 0..15, high ones 16..31."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.float32)


def _q8_0(blocks: np.ndarray) -> np.ndarray:  # fp16 d | 32 x int8 q;  w = d * q
    return _scale(blocks, 0) * blocks[:, 2:].view(np.int8).astype(np.float32)


def _q4_0(blocks: np.ndarray) -> np.ndarray:  # fp16 d | 16 bytes of nibbles;  w = d * (q - 8)
    return _scale(blocks, 0) * (_nibbles(blocks[:, 2:]) - 8.0)


def _q4_1(blocks: np.ndarray) -> np.ndarray:  # fp16 d | fp16 m | 16 bytes of nibbles;  w = d * q + m
    return _scale(blocks, 0) * _nibbles(blocks[:, 4:]) + _scale(blocks, 2)


def _five_bits(blocks: np.ndarray, high_at: int) -> np.ndarray:
    """Q5_0/Q5_1: [N, 32] 5-bit values from 4 bytes of high bits at `high_at` (one little-endian
    u32, bit j for element j) followed by 16 bytes of nibbles (ordered as in Q4_0)."""
    packed = blocks[:, high_at + 4 : high_at + 20]
    low = np.concatenate([packed & 0x0F, packed >> 4], axis=1)
    high = np.unpackbits(blocks[:, high_at : high_at + 4], axis=1, bitorder="little")
    return (low | (high << 4)).astype(np.float32)


def _q5_0(blocks: np.ndarray) -> np.ndarray:  # fp16 d | u32 high bits | nibbles;  w = d * (q - 16)
    return _scale(blocks, 0) * (_five_bits(blocks, 2) - 16.0)


def _q5_1(blocks: np.ndarray) -> np.ndarray:  # fp16 d | fp16 m | u32 high bits | nibbles;  w = d * q + m
    return _scale(blocks, 0) * _five_bits(blocks, 4) + _scale(blocks, 2)


# k-quants: super-blocks of 256 values in 16 or 8 sub-blocks, each sub-block with its own
# small integer scale (and min) that multiplies the super-block's fp16 d (and dmin). Every
# product d * scale * q below is exact in fp32 (at most 23 of its 24 significant bits: Q6_K's
# 11 for d, 7 for an int8 scale, 5 for q in -32..31), so the only rounding is the one
# subtraction of the min, as in ggml: the result does not depend on the order of operations.
def _k_scale_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins, each [N, 8].

    Sub-blocks 0-3 hold scale and min in the low 6 bits of bytes 0-3 and 4-7; sub-blocks 4-7
    take their low 4 bits from the nibbles of bytes 8-11 and their top 2 from the spare top
    bits of bytes 0-3 (scales) and 4-7 (mins).
    """
    low, high, tail = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([low & 63, (tail & 0x0F) | ((low >> 6) << 4)], axis=1)
    mins = np.concatenate([high & 63, (tail >> 4) | ((high >> 6) << 4)], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _k_dequant(d, scales, dmin, mins, q: np.ndarray) -> np.ndarray:
    """q [N, S, 256/S] -> d * scale * q - dmin * min per sub-block, flattened to [N, 256]."""
    n, s, _ = q.shape
    out = (d * scales).reshape(n, s, 1) * q
    if dmin is not None:
        out -= (dmin * mins).reshape(n, s, 1)
    return out.reshape(n, 256)


def _q2_k(blocks: np.ndarray) -> np.ndarray:
    # 16 bytes scales (low nibble scale, high nibble min) | 64 bytes q | fp16 d | fp16 dmin.
    # Each 128-value half reads 32 bytes of q four times (shifts 0, 2, 4, 6); every 16
    # consecutive values share one scale byte.
    n = len(blocks)
    packed = blocks[:, 16:80].reshape(n, 2, 1, 32)
    shifts = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    q = ((packed >> shifts) & 3).astype(np.float32).reshape(n, 16, 16)
    sc = blocks[:, 0:16]
    return _k_dequant(_scale(blocks, 80), (sc & 0x0F).astype(np.float32), _scale(blocks, 82),
                      (sc >> 4).astype(np.float32), q)


def _q3_k(blocks: np.ndarray) -> np.ndarray:
    # 32 bytes hmask | 64 bytes low 2 bits | 12 bytes of 16 six-bit scales | fp16 d.
    # Low bits are laid out as in Q2_K; value (h, j, l) (half, shift, byte) takes bit 4h + j of
    # hmask[l] as its third bit, and a clear bit means q - 4: q is in -4..3.
    n = len(blocks)
    shifts = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    low = (blocks[:, 32:96].reshape(n, 2, 1, 32) >> shifts) & 3
    bit = np.arange(8, dtype=np.uint8).reshape(1, 2, 4, 1)
    high = (blocks[:, 0:32].reshape(n, 1, 1, 32) >> bit) & 1
    q = (low.astype(np.float32) - 4.0 * (1 - high).astype(np.float32)).reshape(n, 16, 16)
    # Scale j: low 4 bits from byte j % 8 (low nibble for j < 8, high for j >= 8), top 2 bits
    # from byte 8 + j % 4 at bit 2 * (j // 4); stored with a +32 offset.
    packed = blocks[:, 96:108]
    j = np.arange(16)
    low4 = (packed[:, j % 8] >> (4 * (j // 8)).astype(np.uint8)) & 0x0F
    top2 = (packed[:, 8 + j % 4] >> (2 * (j // 4)).astype(np.uint8)) & 3
    scales = (low4 | (top2 << 4)).astype(np.float32) - 32.0
    return _k_dequant(_scale(blocks, 108), scales, None, None, q)


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    # fp16 d | fp16 dmin | 12 bytes scales/mins | 128 bytes: four chunks of 32 bytes, each
    # chunk's low nibbles one sub-block of 32 values and its high nibbles the next.
    n = len(blocks)
    packed = blocks[:, 16:144].reshape(n, 4, 1, 32)
    q = ((packed >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F).astype(np.float32)
    scales, mins = _k_scale_mins(blocks[:, 4:16])
    return _k_dequant(_scale(blocks, 0), scales, _scale(blocks, 2), mins, q.reshape(n, 8, 32))


def _q5_k(blocks: np.ndarray) -> np.ndarray:
    # Q4_K plus 32 bytes (at 16) of fifth bits: sub-block s takes bit s of qh[l].
    n = len(blocks)
    packed = blocks[:, 48:176].reshape(n, 4, 1, 32)
    low = (packed >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F
    high = (blocks[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
    q = low.reshape(n, 8, 32).astype(np.float32) + 16.0 * high.astype(np.float32)
    scales, mins = _k_scale_mins(blocks[:, 4:16])
    return _k_dequant(_scale(blocks, 0), scales, _scale(blocks, 2), mins, q)


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    # 128 bytes low nibbles | 64 bytes top 2 bits | 16 int8 scales | fp16 d; q is in -32..31.
    # Each 128-value half: quarter k, value l (of 32) takes nibble k // 2 of ql[64h + 32(k % 2)
    # + l] and bits 2k, 2k+1 of qh[32h + l]; every 16 consecutive values share one scale.
    n = len(blocks)
    ql = blocks[:, 0:128].reshape(n, 2, 1, 2, 32)
    nib = np.array([0, 4], np.uint8).reshape(1, 1, 2, 1, 1)
    low = ((ql >> nib) & 0x0F).reshape(n, 2, 4, 32)
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32)
    high = (qh >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
    q = (low | (high << 4)).astype(np.float32).reshape(n, 16, 16) - 32.0
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32)
    return _k_dequant(_scale(blocks, 208), scales, None, None, q)


@dataclass(frozen=True, slots=True)
class TensorFormat:
    name: str
    block_size: int  # elements per block
    type_size: int  # bytes per block
    dequantize: Callable[[np.ndarray], np.ndarray]


# ggml type id -> format. Anything else is refused with the list of these names.
TENSOR_FORMATS: dict[int, TensorFormat] = {
    0: TensorFormat("F32", 1, 4, _f32),
    1: TensorFormat("F16", 1, 2, _f16),
    2: TensorFormat("Q4_0", 32, 18, _q4_0),
    3: TensorFormat("Q4_1", 32, 20, _q4_1),
    6: TensorFormat("Q5_0", 32, 22, _q5_0),
    7: TensorFormat("Q5_1", 32, 24, _q5_1),
    8: TensorFormat("Q8_0", 32, 34, _q8_0),
    10: TensorFormat("Q2_K", 256, 84, _q2_k),
    11: TensorFormat("Q3_K", 256, 110, _q3_k),
    12: TensorFormat("Q4_K", 256, 144, _q4_k),
    13: TensorFormat("Q5_K", 256, 176, _q5_k),
    14: TensorFormat("Q6_K", 256, 210, _q6_k),
    30: TensorFormat("BF16", 1, 2, _bf16),
}


def _type_name(ggml_type: int) -> str:
    if ggml_type in TENSOR_FORMATS:
        return TENSOR_FORMATS[ggml_type].name
    try:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(ggml_type).name
    except (ImportError, ValueError):
        return f"type {ggml_type}"


# -- file parsing ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class GGUFTensorInfo:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # torch order (outermost first); the file lists dims innermost first
    offset: int  # absolute byte offset in the file

    @property
    def num_elements(self) -> int:
        return math.prod(self.shape)


@dataclass(slots=True)
class GGUFFile:
    """A parsed GGUF header over a read-only memory map of the whole file."""

    path: Path
    metadata: dict[str, object]
    tensors: dict[str, GGUFTensorInfo]
    buffer: mmap.mmap

    def check_tensor(self, name: str) -> TensorFormat:
        """The tensor's format, once its type, shape and extent are known to be readable."""
        info = self.tensors[name]
        fmt = TENSOR_FORMATS.get(info.ggml_type)
        if fmt is None:
            supported = ", ".join(f.name for f in TENSOR_FORMATS.values())
            raise ModelLoadError(
                f"{self.path}: tensor {name} has type {_type_name(info.ggml_type)}, which docpipe "
                f"cannot dequantize (supported: {supported}); re-quantize the model to one of "
                "those (llama.cpp's llama-quantize, e.g. Q4_K_M or Q8_0)"
            )
        if info.num_elements % fmt.block_size or (info.shape and info.shape[-1] % fmt.block_size):
            raise ModelLoadError(
                f"{self.path}: tensor {name} with shape {info.shape} does not split into "
                f"{fmt.name} blocks of {fmt.block_size}; {_FIX_REDOWNLOAD}"
            )
        if info.offset + info.num_elements // fmt.block_size * fmt.type_size > len(self.buffer):
            raise ModelLoadError(
                f"{self.path}: tensor {name} runs past the end of the file (truncated?); "
                f"{_FIX_REDOWNLOAD}"
            )
        return fmt

    def read_tensor(self, name: str) -> np.ndarray:
        """The dequantized tensor as a fresh, writable float32 array in torch order."""
        fmt = self.check_tensor(name)
        info = self.tensors[name]
        num_blocks = info.num_elements // fmt.block_size
        blocks = np.frombuffer(
            self.buffer, np.uint8, num_blocks * fmt.type_size, info.offset
        ).reshape(num_blocks, fmt.type_size)
        values = fmt.dequantize(blocks)
        assert values.shape == (num_blocks, fmt.block_size) and values.dtype == np.float32, (
            f"{fmt.name} dequantizer returned {values.shape} {values.dtype}: bad block layout?"
        )
        return values.reshape(info.shape)


class _Cursor:
    """Sequential little-endian reads from a buffer."""

    def __init__(self, buffer: mmap.mmap) -> None:
        self.buffer = buffer
        self.pos = 0

    def scalar(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.scalar("<Q")
        raw = self.buffer[self.pos : self.pos + length]
        if len(raw) != length:
            raise struct.error("string runs past the end of the file")
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def value(self, value_type: int):
        if value_type in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[value_type])
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type, count = self.scalar("<I"), self.scalar("<Q")
            if item_type in _NUMPY_DTYPES:
                dtype = np.dtype(_NUMPY_DTYPES[item_type])
                items = np.frombuffer(self.buffer, dtype, count, self.pos)
                self.pos += count * dtype.itemsize
                return items.tolist()
            if item_type == _STRING:  # vocabularies: ~100k strings, so a tight loop
                buffer, unpack, pos, items = self.buffer, struct.Struct("<Q").unpack_from, self.pos, []
                for _ in range(count):
                    (length,) = unpack(buffer, pos)
                    items.append(buffer[pos + 8 : pos + 8 + length].decode("utf-8", errors="replace"))
                    pos += 8 + length
                if pos > len(buffer):
                    raise struct.error("string array runs past the end of the file")
                self.pos = pos
                return items
            return [self.value(item_type) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {value_type}")


def open_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's metadata and tensor table (tensor data stays on disk)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:  # ValueError: empty file
        raise ModelLoadError(f"{path}: cannot open GGUF file ({exc}); check the path") from None
    if buffer[:4] != _MAGIC:
        raise ModelLoadError(
            f"{path}: not a GGUF file (magic {bytes(buffer[:4])!r}); pass a .gguf file from llama.cpp"
        )
    cursor = _Cursor(buffer)
    cursor.pos = 4
    try:
        version = cursor.scalar("<I")
        if version not in (2, 3):
            hint = " (big-endian files are not supported)" if version > 0xFFFF else ""
            raise ModelLoadError(
                f"{path}: GGUF version {version} is not supported{hint}; convert it with a current "
                "llama.cpp to a little-endian GGUF v3 file"
            )
        num_tensors, num_kv = cursor.scalar("<Q"), cursor.scalar("<Q")
        metadata: dict[str, object] = {}
        for _ in range(num_kv):
            key = cursor.string()
            metadata[key] = cursor.value(cursor.scalar("<I"))
        entries = []
        for _ in range(num_tensors):
            name = cursor.string()
            num_dims = cursor.scalar("<I")
            dims = struct.unpack_from(f"<{num_dims}Q", buffer, cursor.pos)
            cursor.pos += 8 * num_dims
            entries.append((name, cursor.scalar("<I"), tuple(reversed(dims)), cursor.scalar("<Q")))
    except (struct.error, ValueError) as exc:
        raise ModelLoadError(
            f"{path}: corrupt or truncated GGUF header ({exc}); {_FIX_REDOWNLOAD}"
        ) from None
    alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
    data_start = -(-cursor.pos // alignment) * alignment
    tensors = {
        name: GGUFTensorInfo(name, ggml_type, shape, data_start + offset)
        for name, ggml_type, shape, offset in entries
    }
    return GGUFFile(path, metadata, tensors, buffer)


def read_gguf_metadata(path: str | Path) -> dict[str, object]:
    """All key/value fields of a GGUF file as plain Python values (str, int, float, bool, list)."""
    return open_gguf(path).metadata


# -- config ---------------------------------------------------------------------------------
_REQUIRED = object()


def _meta(gguf_file: GGUFFile, key: str, default: object = _REQUIRED) -> object:
    if key in gguf_file.metadata:
        return gguf_file.metadata[key]
    if default is _REQUIRED:
        raise ModelLoadError(f"{gguf_file.path}: metadata key {key} is missing; {_FIX_REDOWNLOAD}")
    return default


def _llama3_freq_factors(scaling: dict, rope_theta: float, head_dim: int) -> np.ndarray:
    """The per-pair RoPE divisors llama.cpp stores in `rope_freqs.weight` for llama3 scaling."""
    inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    old_ctx = scaling["original_max_position_embeddings"]
    low, high, factor = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["factor"]
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, mid))


def _rope_scaling(gguf_file: GGUFFile, arch: str, rope_theta: float, head_dim: int) -> dict | None:
    path = gguf_file.path
    kind = _meta(gguf_file, f"{arch}.rope.scaling.type", None)
    factor = _meta(gguf_file, f"{arch}.rope.scaling.factor", None)
    if kind is None and _meta(gguf_file, f"{arch}.rope.scale_linear", None) is not None:
        kind, factor = "linear", _meta(gguf_file, f"{arch}.rope.scale_linear")
    if kind not in (None, "none"):
        scaling: dict[str, object] = {"rope_type": kind, "factor": float(factor or 1.0)}
        original = _meta(gguf_file, f"{arch}.rope.scaling.original_context_length", None)
        if original is not None:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling
    if "rope_freqs.weight" not in gguf_file.tensors:
        return None
    # Llama 3.1+ files carry llama3 scaling only as precomputed per-pair divisors. Every Llama 3
    # release uses low/high = 1/4 over an 8192-token original context; accept the file only if
    # those settings reproduce the stored divisors.
    stored = gguf_file.read_tensor("rope_freqs.weight").astype(np.float64).ravel()
    scaling = {"rope_type": "llama3", "factor": float(stored.max()), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    expected = _llama3_freq_factors(scaling, rope_theta, head_dim)
    if expected.shape != stored.shape or not np.allclose(expected, stored, rtol=1e-4):
        raise ModelLoadError(
            f"{path}: rope_freqs.weight holds RoPE frequency factors that match no llama3 "
            "rope_scaling docpipe knows; load the model's HF safetensors checkpoint instead"
        )
    return scaling if scaling["factor"] != 1.0 else None


def _architecture(gguf_file: GGUFFile) -> tuple[str, GGUFArchitecture]:
    arch = _meta(gguf_file, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(
            f"{gguf_file.path}: GGUF architecture {arch!r} is not supported; docpipe loads "
            f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)} GGUF files (use the model's HF safetensors "
            "checkpoint for other architectures)"
        )
    if arch == "llama" and _meta(gguf_file, "llama.expert_count", 0):
        return arch, MIXTRAL
    return arch, GGUF_ARCHITECTURES[arch]


def _gguf_config(gguf_file: GGUFFile) -> dict:
    """The HF config.json dict (HF field names) of the model a GGUF file holds."""
    path = gguf_file.path
    arch, family = _architecture(gguf_file)
    if _meta(gguf_file, f"{arch}.expert_count", 0) and not family.is_moe:
        raise ModelLoadError(
            f"{path}: mixture-of-experts {arch} GGUF files are not supported; load the model's HF "
            "safetensors checkpoint instead"
        )
    _require(gguf_file, "token_embd.weight")
    # From the header alone, so a truncated download or an unreadable quantization is refused
    # when the model is described (before a run starts), not when a replica loads it.
    tensor_map = _tensor_map(family.model_type)
    for name in gguf_file.tensors:
        if _template(name)[0] in tensor_map or name in _CONSUMED:
            gguf_file.check_tensor(name)
    hidden_size = int(_meta(gguf_file, f"{arch}.embedding_length"))
    num_heads = int(_meta(gguf_file, f"{arch}.attention.head_count"))
    num_kv_heads = _meta(gguf_file, f"{arch}.attention.head_count_kv", num_heads)
    if isinstance(num_kv_heads, list):  # per-layer counts; docpipe needs one
        if len(set(num_kv_heads)) != 1:
            raise ModelLoadError(
                f"{path}: layers have different KV head counts {sorted(set(num_kv_heads))}, which "
                "docpipe does not support; load the model's HF safetensors checkpoint instead"
            )
        num_kv_heads = num_kv_heads[0]
    head_dim = int(_meta(gguf_file, f"{arch}.attention.key_length", hidden_size // num_heads))
    rope_dims = _meta(gguf_file, f"{arch}.rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise ModelLoadError(
            f"{path}: RoPE covers {rope_dims} of {head_dim} head dims (partial rotary), which "
            f"{arch} models do not use; check that the file is a {arch} model"
        )
    rope_theta = float(_meta(gguf_file, f"{arch}.rope.freq_base", 10000.0))
    num_layers = int(_meta(gguf_file, f"{arch}.block_count"))
    has_bias = "blk.0.attn_q.bias" in gguf_file.tensors
    config: dict[str, object] = {
        "model_type": family.model_type,
        "architectures": [family.hf_class],
        "vocab_size": gguf_file.tensors["token_embd.weight"].shape[0],
        "hidden_size": hidden_size,
        "intermediate_size": int(_meta(gguf_file, f"{arch}.feed_forward_length", 0)),
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(num_kv_heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(_meta(gguf_file, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": rope_theta,
        "max_position_embeddings": int(_meta(gguf_file, f"{arch}.context_length", 4096)),
        # llama.cpp writes output.weight only when it differs from the embedding.
        "tie_word_embeddings": "output.weight" not in gguf_file.tensors,
        "attention_bias": has_bias,
        "bos_token_id": _meta(gguf_file, "tokenizer.ggml.bos_token_id", None),
        "eos_token_id": _meta(gguf_file, "tokenizer.ggml.eos_token_id", None),
        "pad_token_id": _meta(gguf_file, "tokenizer.ggml.padding_token_id", None),
    }
    if family.model_type.startswith("qwen"):
        config["use_sliding_window"] = False  # Qwen GGUF files carry no window
    if family.model_type == "gemma3_text":
        config |= _gemma3_config(gguf_file, arch, config)
    if family.model_type == "mixtral":
        config |= _mixtral_config(gguf_file, arch, config)
    elif family.is_moe:
        config |= _moe_config(gguf_file, arch, family, num_layers)
        if family.model_type == "qwen2_moe":
            config["qkv_bias"] = has_bias
    if config["intermediate_size"] == 0 and (not family.is_moe or family.model_type == "mixtral"):
        _meta(gguf_file, f"{arch}.feed_forward_length")  # raises: missing
    scaling = _rope_scaling(gguf_file, arch, rope_theta, head_dim)
    if scaling is not None:
        config["rope_scaling"] = scaling
    return config


# Gemma 3 files store neither the local/global interleave nor the local RoPE base: llama.cpp and
# transformers both take layer i as sliding iff i % 6 < 5, with base 10000 on those layers.
GEMMA3_SLIDING_PATTERN = 6
GEMMA3_LOCAL_ROPE_BASE = 10_000.0


def _gemma3_config(gguf_file: GGUFFile, arch: str, config: dict) -> dict:
    num_layers, head_dim = config["num_hidden_layers"], config["head_dim"]
    # Scores are scaled by query_pre_attn_scalar**-0.5, which the file does not store either;
    # llama.cpp uses head_dim, except for the 62-layer 27B model: hidden_size / heads (168).
    scalar = head_dim
    if num_layers == 62:
        scalar = config["hidden_size"] // config["num_attention_heads"]
    del config["hidden_act"]
    return {
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": float(_meta(gguf_file, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "sliding_window": int(_meta(gguf_file, f"{arch}.attention.sliding_window")),
        "sliding_window_pattern": GEMMA3_SLIDING_PATTERN,
        "layer_types": [
            "sliding_attention" if i % GEMMA3_SLIDING_PATTERN < GEMMA3_SLIDING_PATTERN - 1
            else "full_attention"
            for i in range(num_layers)
        ],
        "rope_local_base_freq": GEMMA3_LOCAL_ROPE_BASE,
        "query_pre_attn_scalar": scalar,
        "final_logit_softcapping": _meta(gguf_file, f"{arch}.final_logit_softcapping", None),
        "attn_logit_softcapping": _meta(gguf_file, f"{arch}.attn_logit_softcapping", None),
    }


def _moe_config(gguf_file: GGUFFile, arch: str, family: GGUFArchitecture, num_layers: int) -> dict:
    """qwen2_moe / qwen3_moe fields. Layers without a router (ffn_gate_inp) are dense MLPs."""
    dense_layers = [i for i in range(num_layers) if f"blk.{i}.ffn_gate_inp.weight" not in gguf_file.tensors]
    fields: dict[str, object] = {
        "num_experts": int(_meta(gguf_file, f"{arch}.expert_count")),
        "num_experts_per_tok": int(_meta(gguf_file, f"{arch}.expert_used_count")),
        "moe_intermediate_size": int(_meta(gguf_file, f"{arch}.expert_feed_forward_length")),
        # qwen2_moe routes without renormalising the top-k weights unless the file says so;
        # llama.cpp always renormalises for qwen3_moe, as HF's Qwen3-MoE configs do.
        "norm_topk_prob": bool(_meta(gguf_file, f"{arch}.expert_weights_norm",
                                     family.model_type == "qwen3_moe")),
        "decoder_sparse_step": 1,
        "mlp_only_layers": dense_layers,
    }
    if family.model_type == "qwen2_moe":
        fields["shared_expert_intermediate_size"] = int(
            _meta(gguf_file, f"{arch}.expert_shared_feed_forward_length", 0)
        )
    return fields


def _mixtral_config(gguf_file: GGUFFile, arch: str, config: dict) -> dict:
    """mixtral fields. Every layer routes (HF's Mixtral has no dense layers, and a layer without
    ffn_gate_inp is reported missing); an expert is feed_forward_length wide unless the file
    says otherwise, as in llama.cpp."""
    width = int(_meta(gguf_file, f"{arch}.expert_feed_forward_length", config["intermediate_size"]))
    return {
        "num_local_experts": int(_meta(gguf_file, f"{arch}.expert_count")),
        "num_experts_per_tok": int(_meta(gguf_file, f"{arch}.expert_used_count")),
        "intermediate_size": width,
        "sliding_window": None,  # llama files carry no window
    }


def read_gguf_config(path: str | Path) -> dict:
    """The HF `config.json` dict a GGUF file describes, without reading its weights."""
    return _gguf_config(open_gguf(path))


# -- tensors --------------------------------------------------------------------------------
# GGUF name -> (HF name, head-count field whose rows to un-permute in llama files, required).
# `{i}` is the layer; `{e}` marks a [E, ...] tensor of all experts, split into one per expert.
GGUF_TO_HF: dict[str, tuple[str, str | None, bool]] = {
    "token_embd.weight": ("model.embed_tokens.weight", None, True),
    "output_norm.weight": ("model.norm.weight", None, True),
    "output.weight": ("lm_head.weight", None, False),
    "blk.{i}.attn_norm.weight": ("model.layers.{i}.input_layernorm.weight", None, True),
    "blk.{i}.attn_q.weight": ("model.layers.{i}.self_attn.q_proj.weight", "num_attention_heads", True),
    "blk.{i}.attn_k.weight": ("model.layers.{i}.self_attn.k_proj.weight", "num_key_value_heads", True),
    "blk.{i}.attn_v.weight": ("model.layers.{i}.self_attn.v_proj.weight", None, True),
    "blk.{i}.attn_q.bias": ("model.layers.{i}.self_attn.q_proj.bias", "num_attention_heads", False),
    "blk.{i}.attn_k.bias": ("model.layers.{i}.self_attn.k_proj.bias", "num_key_value_heads", False),
    "blk.{i}.attn_v.bias": ("model.layers.{i}.self_attn.v_proj.bias", None, False),
    "blk.{i}.attn_q_norm.weight": ("model.layers.{i}.self_attn.q_norm.weight", None, False),
    "blk.{i}.attn_k_norm.weight": ("model.layers.{i}.self_attn.k_norm.weight", None, False),
    "blk.{i}.attn_output.weight": ("model.layers.{i}.self_attn.o_proj.weight", None, True),
    "blk.{i}.ffn_norm.weight": ("model.layers.{i}.post_attention_layernorm.weight", None, True),
    # Dense MLP, or the MoE router, experts and shared expert (required per layer kind).
    "blk.{i}.ffn_gate.weight": ("model.layers.{i}.mlp.gate_proj.weight", None, False),
    "blk.{i}.ffn_up.weight": ("model.layers.{i}.mlp.up_proj.weight", None, False),
    "blk.{i}.ffn_down.weight": ("model.layers.{i}.mlp.down_proj.weight", None, False),
    "blk.{i}.ffn_gate_inp.weight": ("model.layers.{i}.mlp.gate.weight", None, False),
    "blk.{i}.ffn_gate_exps.weight": ("model.layers.{i}.mlp.experts.{e}.gate_proj.weight", None, False),
    "blk.{i}.ffn_up_exps.weight": ("model.layers.{i}.mlp.experts.{e}.up_proj.weight", None, False),
    "blk.{i}.ffn_down_exps.weight": ("model.layers.{i}.mlp.experts.{e}.down_proj.weight", None, False),
    "blk.{i}.ffn_gate_shexp.weight": ("model.layers.{i}.mlp.shared_expert.gate_proj.weight", None, False),
    "blk.{i}.ffn_up_shexp.weight": ("model.layers.{i}.mlp.shared_expert.up_proj.weight", None, False),
    "blk.{i}.ffn_down_shexp.weight": ("model.layers.{i}.mlp.shared_expert.down_proj.weight", None, False),
    "blk.{i}.ffn_gate_inp_shexp.weight": ("model.layers.{i}.mlp.shared_expert_gate.weight", None, False),
}
# Where an architecture's GGUF names mean other HF tensors. Gemma 3 has four norms per layer:
# its ffn_norm is the norm before the MLP, and the outputs of attention and MLP are normed too.
GGUF_TO_HF_OVERRIDES: dict[str, dict[str, tuple[str, str | None, bool]]] = {
    "gemma3_text": {
        "blk.{i}.post_attention_norm.weight": (
            "model.layers.{i}.post_attention_layernorm.weight", None, True),
        "blk.{i}.ffn_norm.weight": ("model.layers.{i}.pre_feedforward_layernorm.weight", None, True),
        "blk.{i}.post_ffw_norm.weight": (
            "model.layers.{i}.post_feedforward_layernorm.weight", None, True),
        "blk.{i}.attn_q_norm.weight": ("model.layers.{i}.self_attn.q_norm.weight", None, True),
        "blk.{i}.attn_k_norm.weight": ("model.layers.{i}.self_attn.k_norm.weight", None, True),
    },
    # Mixtral's HF checkpoints name the MoE block block_sparse_moe, its experts w1 (gate),
    # w3 (up) and w2 (down). Files converted before mid-2024 store one tensor per expert
    # (`blk.{i}.ffn_gate.{e}.weight`), later ones one [E, rows, cols] tensor per projection.
    "mixtral": {
        "blk.{i}.ffn_gate_inp.weight": ("model.layers.{i}.block_sparse_moe.gate.weight", None, False),
        **{
            f"blk.{{i}}.ffn_{proj}{suffix}.weight": (
                f"model.layers.{{i}}.block_sparse_moe.experts.{{e}}.{w}.weight", None, False)
            for proj, w in (("gate", "w1"), ("up", "w3"), ("down", "w2"))
            for suffix in ("_exps", ".{e}")
        },
    },
}


def _tensor_map(model_type: str) -> dict[str, tuple[str, str | None, bool]]:
    return GGUF_TO_HF | GGUF_TO_HF_OVERRIDES.get(model_type, {})


_DENSE_MLP = ("ffn_gate", "ffn_up", "ffn_down")
_MOE_MLP = ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(.+)")
_EXPERT_NAME = re.compile(r"(ffn_(?:gate|up|down))\.(\d+)\.weight")  # old per-expert names
_CONSUMED = {"rope_freqs.weight"}  # folded into the config's rope_scaling


def _require(gguf_file: GGUFFile, name: str) -> None:
    if name not in gguf_file.tensors:
        arch = gguf_file.metadata.get("general.architecture", "llama")
        raise ModelLoadError(
            f"{gguf_file.path}: required tensor {name} is missing; the file is incomplete or not a "
            f"{arch} model ({_FIX_REDOWNLOAD})"
        )


def _required_tensors(config: dict) -> list[str]:
    tensor_map = _tensor_map(config["model_type"])
    names = [t for t, (_, _, required) in tensor_map.items() if required and "{i}" not in t]
    layer_names = [t for t, (_, _, required) in tensor_map.items() if required and "{i}" in t]
    dense_layers = set(config.get("mlp_only_layers", ())) if _num_experts(config) else None
    for i in range(config["num_hidden_layers"]):
        names += [t.format(i=i) for t in layer_names]
        mlp = _MOE_MLP if dense_layers is not None and i not in dense_layers else _DENSE_MLP
        names += [f"blk.{i}.{n}.weight" for n in mlp]
        if config["model_type"] in ("qwen3", "qwen3_moe"):
            names += [f"blk.{i}.attn_q_norm.weight", f"blk.{i}.attn_k_norm.weight"]
    return names


def unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: per head, rotary pairs interleaved -> HF's half split.

    llama.cpp rotates adjacent rows (x0, y0, x1, y1, ...); HF's rotate_half pairs row j with
    row j + D/2. The converter reorders each head's rows into the first form; this reverses it.
    """
    rows = weight.shape[0]
    assert rows % (2 * num_heads) == 0, f"{rows} rows do not split into {num_heads} rotary heads"
    per_head = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
    return np.ascontiguousarray(per_head.swapaxes(1, 2)).reshape(weight.shape)


def iter_gguf_tensors(
    path: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[dict, Iterator[tuple[str, torch.Tensor]]]:
    """`(hf_config, tensors)`: the config now (required tensors checked), and the HF-named
    tensors one at a time as they are dequantized, so a loader copying them into a model
    holds only one extra tensor at a time instead of a second copy of the model."""
    gguf_file = open_gguf(path)
    config = _gguf_config(gguf_file)
    tensor_map = _tensor_map(config["model_type"])
    for name in _required_tensors(config):
        if (name.endswith("_exps.weight") and name not in gguf_file.tensors
                and _template(name)[0].replace("_exps.", ".{e}.") in tensor_map
                and all(name.replace("_exps.", f".{e}.") in gguf_file.tensors
                        for e in range(_num_experts(config)))):
            continue  # an older file: one tensor per expert
        _require(gguf_file, name)
    return config, _hf_tensors(gguf_file, config, dtype)


def _num_experts(config: dict) -> int:
    return int(config.get("num_local_experts") or config.get("num_experts") or 0)


def _template(name: str) -> tuple[str, str | None, str | None]:
    """(table key, layer, expert) of a GGUF tensor name: `blk.3.ffn_up.5.weight` is
    (`blk.{i}.ffn_up.{e}.weight`, "3", "5"); a name outside the blocks is its own key."""
    match = _LAYER_NAME.fullmatch(name)
    if match is None:
        return name, None, None
    layer, rest = match.groups()
    expert = _EXPERT_NAME.fullmatch(rest)
    if expert is not None:
        return f"blk.{{i}}.{expert.group(1)}.{{e}}.weight", layer, expert.group(2)
    return f"blk.{{i}}.{rest}", layer, None


def _hf_tensors(
    gguf_file: GGUFFile, config: dict, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    _, family = _architecture(gguf_file)
    num_layers = config["num_hidden_layers"]
    tensor_map = _tensor_map(family.model_type)
    num_experts = _num_experts(config)
    count = 0
    for name in gguf_file.tensors:
        template, layer, expert = _template(name)
        if template not in tensor_map:
            if name not in _CONSUMED:
                logger.warning("%s: ignoring tensor %s (no HF %s equivalent)", gguf_file.path,
                               name, family.model_type)
            continue
        if layer is not None and int(layer) >= num_layers:
            logger.warning(
                "%s: ignoring tensor %s (block_count is %d)", gguf_file.path, name, num_layers
            )
            continue
        hf_template, heads_field, _ = tensor_map[template]
        values = gguf_file.read_tensor(name)
        if family.norm_shift and name.endswith("norm.weight"):
            # In fp32, as transformers' GGUF loader does (the model then adds 1 back, as HF's).
            values -= np.float32(family.norm_shift)
        if heads_field is not None and family.permuted_rotary:
            values = unpermute_rotary_rows(values, config[heads_field])
        stacked = "{e}" in hf_template and expert is None  # [E, rows, cols]
        if expert is not None and int(expert) >= num_experts or (
                stacked and values.shape[0] != num_experts):
            raise ModelLoadError(
                f"{gguf_file.path}: tensor {name} with shape {values.shape} does not fit "
                f"expert_count {num_experts}; {_FIX_REDOWNLOAD}"
            )
        hf_name = hf_template.format(i=layer or "", e="{e}" if expert is None else expert)
        if template.endswith("ffn_gate_inp_shexp.weight"):
            values = values.reshape(1, -1)  # GGUF stores the [1, hidden] gate as a vector
        if stacked:  # one HF tensor per expert
            for e, expert in enumerate(values):
                count += 1
                yield hf_name.format(e=e), torch.from_numpy(expert).to(dtype)
        else:
            count += 1
            yield hf_name, torch.from_numpy(values).to(dtype)
    logger.debug("%s: read %d tensors", gguf_file.path, count)


def load_gguf(
    path: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[dict, dict[str, torch.Tensor]]:
    """`(hf_config, state_dict)` of a GGUF file, with HF names, shapes and q/k row order."""
    config, tensors = iter_gguf_tensors(path, dtype)
    return config, dict(tensors)
