"""Native CPU kernels, compiled on first use and loaded through ctypes.

Each source is its own library, so one that does not compile here (an old g++ without AVX-512
BF16 intrinsics, say) leaves the others working:

`csrc/paged_decode.cpp`: decode attention reading K/V in place from the paged cache; q and the
    cache may differ in type (fp32 q, bf16 cache). AVX-512 and AVX2 + FMA paths for head_dim
    64/128/256 and up to 16 query heads per KV head, a portable one for any other shape; on AMX
    CPUs the scores of bf16 decode on the tile unit.
`csrc/prefill_attention_amx.cpp`: causal prefill attention for bf16 on AMX tiles (Intel Sapphire
    Rapids and later), head_dim 64/128/256.
`csrc/prefill_attention.cpp`: causal prefill attention for bf16 (AVX-512 BF16 CPUs).
`csrc/prefill_attention_f32.cpp`: causal prefill attention for fp32 queries over an fp32 or
    bf16 cache (AVX2 + FMA or AVX-512), head_dim 64/128/256.
`csrc/elementwise.cpp`: RMSNorm, SwiGLU and rotary embedding fused into one pass each.

Each is built with the system C++ compiler (`g++`, or `$CXX`) for `cpu_info().march` (the
machine's own CPU, or x86-64-v3 under DOCPIPE_CPU_ISA=avx2: see models/cpu.py) into a cache
folder, keyed by its source, common.h, the flags, the compiler and the CPU (`cpu_info().key()`):
built once per machine, all sources in parallel (a few seconds), and reused by every process,
Ray workers included. No torch headers are needed.

When no compiler is found or `DOCPIPE_NATIVE=0` is set, every accessor here returns None; when
one source fails to build, the accessors of that source do. Either way the model keeps its
pure-torch path (the same results within rounding), with one warning saying why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from models.cpu import cpu_info

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
HEADERS = ["common.h"]
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
# (compute dtype, KV cache dtype) pairs the attention kernels take.
ATTENTION_DTYPES = {(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                    (torch.float32, torch.bfloat16)}
# docpipe_paged_decode_path's codes
DECODE_PATHS = {0: "portable", 1: "simd", 2: "avx512", 3: "amx"}

_i64, _ptr, _int, _f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
_PREFILL = {
    "docpipe_prefill_attention": ([_int, _int, _ptr, _i64, _ptr, _ptr, _i64, _ptr, _i64, _ptr,
                                   _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _int, _int, _int, _f32],
                                  _int),
    "docpipe_prefill_supported": ([_int, _int, _int, _int], _int),
}
# Per source: what the model loses without it (for the warning), and its functions'
# (argtypes, restype).
SOURCES = {
    "paged_decode.cpp": ("decode attention", {
        "docpipe_paged_decode": ([_int, _int, _ptr, _i64, _ptr, _ptr, _i64, _ptr, _i64, _ptr,
                                  _ptr, _ptr, _ptr, _i64, _int, _int, _int, _f32], _int),
        "docpipe_paged_decode_limits": ([ctypes.POINTER(_int), ctypes.POINTER(_int)], _int),
        "docpipe_paged_decode_path": ([_int, _int, _int, _int], _int),
        "docpipe_paged_decode_simd_width": ([], _int),
    }),
    "prefill_attention_amx.cpp": ("AMX bf16 prefill attention", _PREFILL),
    "prefill_attention.cpp": ("bf16 prefill attention", _PREFILL),
    "prefill_attention_f32.cpp": ("fp32 prefill attention", _PREFILL),
    "elementwise.cpp": ("RMSNorm, SwiGLU and rotary embedding", {
        "docpipe_rms_norm": ([_int, _ptr, _i64, _ptr, _ptr, _i64, _i64, _f32], None),
        "docpipe_silu_mul": ([_int, _ptr, _i64, _ptr, _i64, _i64], None),
        "docpipe_rotary": ([_int, _ptr, _i64, _ptr, _i64, _i64, _i64, _ptr, _ptr], None),
    }),
    # models/quant.py: matmul over packed GGUF blocks, and their dequantization to tiles
    "qmatmul.cpp": ("packed GGUF matmul", {
        "docpipe_qmatmul": ([_int, _int, _ptr, _i64, _i64, _ptr, _i64, _i64, _ptr, _i64], _int),
        "docpipe_dequantize_rows": ([_int, _int, _ptr, _i64, _i64, _ptr], _int),
        "docpipe_qmatmul_supported": ([_int, _i64], _int),
        "docpipe_qmatmul_max_rows": ([], _int),
        "docpipe_qmatmul_path": ([], _int),
        "docpipe_qmatmul_amx": ([_int, _ptr, _i64, _i64, _ptr, _i64, _i64, _ptr, _i64], _int),
        "docpipe_qmatmul_amx_max_rows": ([], _int),
    }),
}
# Prefill libraries in order of preference: the first that supports a shape computes it.
PREFILL_SOURCES = ["prefill_attention_amx.cpp", "prefill_attention.cpp",
                   "prefill_attention_f32.cpp"]


def cache_dir() -> Path:
    """$DOCPIPE_CACHE_DIR/kernels, else $XDG_CACHE_HOME (or ~/.cache)/docpipe/kernels."""
    if os.environ.get("DOCPIPE_CACHE_DIR"):
        return Path(os.environ["DOCPIPE_CACHE_DIR"]) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "docpipe" / "kernels"


def flags() -> list[str]:
    """The compiler flags, for the CPU level `cpu_info()` reports."""
    return [*FLAGS, *cpu_info().compile_flags]


def compiler() -> str | None:
    """$CXX, else g++ on the PATH, else None."""
    return os.environ.get("CXX") or shutil.which("g++")


def _target(source: str, compiler: str) -> Path:
    """Where the library of `source` is cached: named by a hash of what it depends on."""
    parts = [(CSRC / name).read_bytes() for name in [source, *HEADERS]]
    key = hashlib.sha256(b"\0".join(
        [*parts, " ".join(flags()).encode(), compiler.encode(), cpu_info().key().encode()]
    )).hexdigest()[:16]
    return cache_dir() / f"{Path(source).stem}-{key}.so"


def _build(source: str, compiler: str) -> Path:
    """The library of one source, built unless the cache holds it; raises on failure."""
    target = _target(source, compiler)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build under a temporary name and rename: processes building at once never load a
    # half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [compiler, *flags(), f"-I{CSRC}", str(CSRC / source), "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            err = [line for line in proc.stderr.strip().splitlines() if "error" in line]
            err = err or proc.stderr.strip().splitlines()
            raise RuntimeError(err[0] if err else f"exit code {proc.returncode}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load(source: str, compiler: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(_build(source, compiler)))
    for name, (argtypes, restype) in SOURCES[source][1].items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib


@functools.cache
def library() -> dict[str, ctypes.CDLL]:
    """The kernel libraries that built and loaded, by source name ("paged_decode.cpp", ...);
    empty when none can be used (see the module docstring)."""
    if os.environ.get("DOCPIPE_NATIVE", "1") == "0":
        return {}
    cxx = compiler()
    if cxx is None:
        logger.warning("No C++ compiler (g++ or $CXX): the model uses its slower pure-torch "
                       "CPU path. Install g++ to build the native kernels.")
        return {}
    # Builds are compiler processes: threads run them in parallel.
    with ThreadPoolExecutor(max_workers=len(SOURCES)) as pool:
        futures = {s: pool.submit(_load, s, cxx) for s in SOURCES}
    libs = {}
    for source, future in futures.items():
        try:
            libs[source] = future.result()
        except Exception as exc:  # any build or load failure: fall back, say why
            logger.warning("Building the native CPU kernel csrc/%s failed (%s); %s uses the "
                           "slower pure-torch path. Set DOCPIPE_NATIVE=0 to silence this.",
                           source, exc, SOURCES[source][0])
    return libs


def _lib(source: str) -> ctypes.CDLL | None:
    return library().get(source)


@functools.cache
def _decode_kernel(lib: ctypes.CDLL):
    kernel = lib.docpipe_paged_decode
    max_group, max_dim = ctypes.c_int(), ctypes.c_int()
    lib.docpipe_paged_decode_limits(ctypes.byref(max_group), ctypes.byref(max_dim))
    kernel.max_group, kernel.max_dim = max_group.value, max_dim.value
    return kernel


def paged_decode():
    """Decode attention (`docpipe_paged_decode`, with .max_group and .max_dim), or None.
    It takes the (compute, KV cache) dtype pairs of ATTENTION_DTYPES."""
    lib = _lib("paged_decode.cpp")
    return None if lib is None else _decode_kernel(lib)


def decode_path(dtype: torch.dtype, kv_dtype: torch.dtype, group: int, head_dim: int) -> str | None:
    """Which code path `paged_decode()` takes for these dtypes and head shape ("amx", "avx512",
    "simd" (see `decode_simd_width`), "portable"), None when it does not take them."""
    lib = _lib("paged_decode.cpp")
    if lib is None or dtype not in DTYPES or kv_dtype not in DTYPES:
        return None
    code = lib.docpipe_paged_decode_path(DTYPES[dtype], DTYPES[kv_dtype], group, head_dim)
    return DECODE_PATHS.get(code)


def decode_simd_width() -> int:
    """fp32 lanes of the decode kernel's SIMD path: 16 (AVX-512), 8 (AVX2), 0 (none)."""
    lib = _lib("paged_decode.cpp")
    return 0 if lib is None else lib.docpipe_paged_decode_simd_width()


def prefill_attention(dtype: torch.dtype, kv_dtype: torch.dtype, head_dim: int, group: int):
    """Causal prefill attention (`docpipe_prefill_attention` of the first library of
    PREFILL_SOURCES that computes these dtypes and shape on this CPU), else None: bf16 on
    AMX where the CPU has it, else on AVX-512 BF16; fp32 queries over an fp32 or bf16 cache on
    AVX2 + FMA or AVX-512."""
    if dtype not in DTYPES or kv_dtype not in DTYPES:
        return None
    for source in PREFILL_SOURCES:
        lib = _lib(source)
        if lib is not None and lib.docpipe_prefill_supported(DTYPES[dtype], DTYPES[kv_dtype],
                                                             head_dim, group):
            return lib.docpipe_prefill_attention
    return None


def elementwise(x: torch.Tensor):
    """The library of the fused elementwise kernels when they apply to `x` (CPU, fp32/bf16),
    or None."""
    if x.device.type != "cpu" or x.dtype not in DTYPES:
        return None
    return _lib("elementwise.cpp")


def clear_cache() -> None:
    """Forget the loaded libraries, so the next accessor builds or loads them again (after
    DOCPIPE_CPU_ISA, DOCPIPE_NATIVE or the cache folder changed; tests)."""
    library.cache_clear()
    _decode_kernel.cache_clear()
