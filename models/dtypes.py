"""The compute dtype and the KV cache dtype, resolved for the device they run on.

`dtype="auto"` (the default everywhere) is bf16 only where bf16 is fast:

    CUDA  -> bfloat16 (float16 on GPUs without bf16)
    CPU   -> bfloat16 with native bf16 dot products (AVX-512 BF16, AMX, Arm BF16), else float32

On CPUs without them PyTorch's bf16 GEMMs run an order of magnitude slower than fp32 (measured
on Zen 3, AVX2 only: 1 against 140 GFLOP/s; docpipe prefill 93 against 490 tok/s), so an
explicit bfloat16 there logs a warning with the fix.

`kv_cache_dtype="auto"` is the compute dtype (see `resolve_kv_cache_dtype` for the measurement
behind it); "bfloat16" with fp32 compute halves the KV bytes (memory, and what decode reads).
"""

from __future__ import annotations

import functools
import logging

import torch

from models.cpu import cpu_info

logger = logging.getLogger(__name__)

NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
         "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
CHOICES = ("auto", "float32", "bfloat16", "float16")  # what the CLI and job files accept
KV_CHOICES = ("auto", "float32", "bfloat16")


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float32 -> "float32" (the name recorded in rows and fingerprints)."""
    return str(dtype).removeprefix("torch.")


def _device_type(device: str | torch.device | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def auto_dtype(device: str | torch.device | None = "cpu") -> torch.dtype:
    """The fastest accurate-enough compute dtype for `device` (see the module docstring)."""
    kind = _device_type(device)
    if kind == "cuda":
        # Without a visible GPU (a driver planning for GPU replicas) assume bf16 (Ampere and
        # later); a replica on an older GPU is told to pass float16.
        if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    if kind == "cpu":
        return torch.bfloat16 if cpu_info().has_native_bf16 else torch.float32
    return torch.float32


@functools.cache
def _say_choice(kind: str, name: str, reason: str) -> None:
    logger.info("dtype auto -> %s on %s (%s)", name, kind, reason)


@functools.cache
def _warn_slow_bf16(describe: str) -> None:
    logger.warning(
        "dtype bfloat16 on a CPU without native bf16 dot products (%s): bf16 matmuls run "
        "about 10-100x slower than fp32 there (measured on Zen 3: 1 against 140 GFLOP/s, "
        "docpipe prefill 93 against 490 tok/s). Use --dtype auto (the default) or float32.",
        describe)


def resolve_dtype(dtype: str | torch.dtype = "auto",
                  device: str | torch.device | None = "cpu") -> torch.dtype:
    """A dtype name (or "auto") as the torch dtype it means on `device`."""
    kind = _device_type(device)
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype == "auto":
        resolved = auto_dtype(kind)
        if kind == "cpu":
            reason = cpu_info().describe()
        else:
            reason = "bf16 supported" if resolved == torch.bfloat16 else "no bf16 on this GPU"
        _say_choice(kind, dtype_name(resolved), reason)
        return resolved
    elif dtype in NAMES:
        resolved = NAMES[dtype]
    else:
        raise ValueError(f"dtype={dtype!r} is not supported; use auto, float32, bfloat16 or float16")
    if resolved == torch.bfloat16 and kind == "cpu" and not cpu_info().has_native_bf16:
        _warn_slow_bf16(cpu_info().describe())
    if resolved == torch.bfloat16 and kind == "cuda" and torch.cuda.is_available() and (
            not torch.cuda.is_bf16_supported()):
        raise ValueError("dtype=bfloat16: this GPU has no bf16 support; use float16 or auto")
    return resolved


def resolve_kv_cache_dtype(kv_cache_dtype: str | torch.dtype, dtype: torch.dtype,
                           device: str | torch.device | None = "cpu") -> torch.dtype:
    """The KV cache's element type for compute dtype `dtype`.

    "auto" is the compute dtype. A bf16 cache under fp32 compute halves the KV memory (twice
    the tokens in the same budget) and the bytes decode reads, but every K/V written is
    rounded to bf16, which changes outputs against the fp32 reference. Measured under AVX2
    (benchmarks/engine.py --isa avx2 --kv-cache-dtype bfloat16): W100K 7.5% faster, decode
    +42%; 16 short prompts no faster; 13/16 greedy outputs equal to transformers fp32 against
    15/16. Not worth fp32 fidelity by default; an explicit choice for throughput.
    """
    if isinstance(kv_cache_dtype, torch.dtype):
        kv = kv_cache_dtype
    elif kv_cache_dtype == "auto":
        return dtype
    elif kv_cache_dtype in NAMES and NAMES[kv_cache_dtype] != torch.float16:
        kv = NAMES[kv_cache_dtype]
    else:
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} is not supported; use auto, "
                         "float32 or bfloat16")
    if kv != dtype and not (dtype == torch.float32 and kv == torch.bfloat16):
        raise ValueError(f"kv_cache_dtype={dtype_name(kv)} with dtype={dtype_name(dtype)} is "
                         "not supported; a KV cache in the compute dtype (auto), or bfloat16 "
                         "under float32 compute")
    return kv
