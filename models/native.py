"""Native CPU kernels, compiled on first use and loaded through ctypes.

`csrc/paged_decode.cpp`: decode attention reading K/V in place from the paged cache.
`csrc/prefill_attention.cpp`: causal prefill attention for bf16 (AVX-512 BF16 CPUs).
`csrc/elementwise.cpp`: RMSNorm, SwiGLU and rotary embedding fused into one pass each.

The sources are built with the system C++ compiler (`g++`, or `$CXX`) for this machine's CPU
(-march=native) into one shared library, in a cache folder keyed by the sources, the flags and
the CPU's feature flags: built once per machine (a few seconds) and reused by every process,
Ray workers included. No torch headers are needed.

When no compiler is found, the build fails, or `DOCPIPE_NATIVE=0` is set, every accessor here
returns None and the model keeps its pure-torch path (the same results within rounding), with
one warning saying why.
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
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = ["paged_decode.cpp", "prefill_attention.cpp", "elementwise.cpp"]
HEADERS = ["common.h"]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
DTYPES = {torch.float32: 0, torch.bfloat16: 1}

_i64, _ptr, _int, _f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
SIGNATURES = {
    "docpipe_paged_decode": [_int, _ptr, _i64, _ptr, _ptr, _i64, _ptr, _i64, _ptr, _ptr, _ptr,
                             _ptr, _i64, _int, _int, _int, _f32],
    "docpipe_prefill_attention": [_int, _ptr, _i64, _ptr, _ptr, _i64, _ptr, _i64, _ptr, _ptr,
                                  _ptr, _ptr, _ptr, _ptr, _i64, _int, _int, _int, _f32],
    "docpipe_prefill_supported": [_int, _int],
    "docpipe_rms_norm": [_int, _ptr, _i64, _ptr, _ptr, _i64, _i64, _f32],
    "docpipe_silu_mul": [_int, _ptr, _i64, _ptr, _i64, _i64],
    "docpipe_rotary": [_int, _ptr, _i64, _ptr, _i64, _i64, _i64, _ptr, _ptr],
}


def cache_dir() -> Path:
    """$DOCPIPE_CACHE_DIR/kernels, else $XDG_CACHE_HOME (or ~/.cache)/docpipe/kernels."""
    if os.environ.get("DOCPIPE_CACHE_DIR"):
        return Path(os.environ["DOCPIPE_CACHE_DIR"]) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "docpipe" / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _build(compiler: str) -> Path:
    parts = [(CSRC / name).read_bytes() for name in SOURCES + HEADERS]
    key = hashlib.sha256(b"\0".join(
        [*parts, " ".join(FLAGS).encode(), compiler.encode(), _cpu_flags().encode()]
    )).hexdigest()[:16]
    target = cache_dir() / f"docpipe_kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build under a temporary name and rename: processes building at once never load a
    # half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [compiler, *FLAGS, f"-I{CSRC}", *(str(CSRC / s) for s in SOURCES), "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            err = proc.stderr.strip().splitlines()
            raise RuntimeError(err[-1] if err else f"exit code {proc.returncode}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None when it cannot be used (see the module docstring)."""
    if os.environ.get("DOCPIPE_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CXX") or shutil.which("g++")
    if compiler is None:
        logger.warning("No C++ compiler (g++ or $CXX): the model uses its slower pure-torch "
                       "CPU path. Install g++ to build the native kernels.")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except Exception as exc:  # any build or load failure: fall back, say why
        logger.warning("Building the native CPU kernels failed (%s); the model uses its "
                       "slower pure-torch path. Set DOCPIPE_NATIVE=0 to silence this.", exc)
        return None
    for name, argtypes in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int if name.startswith("docpipe_prefill") else None
    limits = lib.docpipe_paged_decode_limits
    limits.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)]
    max_group, max_dim = ctypes.c_int(), ctypes.c_int()
    limits(ctypes.byref(max_group), ctypes.byref(max_dim))
    lib.docpipe_paged_decode.max_group = max_group.value
    lib.docpipe_paged_decode.max_dim = max_dim.value
    return lib


def _fn(name: str):
    lib = library()
    return None if lib is None else getattr(lib, name)


def paged_decode():
    """Decode attention (`docpipe_paged_decode`, with .max_group and .max_dim), or None."""
    return _fn("docpipe_paged_decode")


def prefill_attention(dtype: torch.dtype, head_dim: int, group: int):
    """Causal prefill attention (`docpipe_prefill_attention`) when it computes this dtype and
    shape on this CPU (bf16, head_dim 64/128, AVX-512 BF16), else None."""
    lib = library()
    if lib is None or dtype != torch.bfloat16 or not lib.docpipe_prefill_supported(head_dim, group):
        return None
    return lib.docpipe_prefill_attention


def elementwise(x: torch.Tensor):
    """The library when its fused elementwise kernels apply to `x` (CPU, fp32/bf16), or None."""
    if x.device.type != "cpu" or x.dtype not in DTYPES:
        return None
    return library()
