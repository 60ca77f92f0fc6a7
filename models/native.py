"""Native CPU kernels, compiled on first use and loaded through ctypes.

`paged_decode` (csrc/paged_decode.cpp) computes decode attention reading K/V in place from the
paged cache. The shared library is built with the system C++ compiler (`g++`, or `$CXX`) for
this machine's CPU (-march=native) into a cache folder keyed by the source, the flags and the
CPU's feature flags, so it is built once per machine and reused by every process (Ray workers
included). Building takes about a second; torch headers are not needed.

When no compiler is found, the build fails, or `DOCPIPE_NATIVE=0` is set, `paged_decode()`
returns None and attention keeps its pure-torch path (same results within rounding), with one
warning saying why.
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

SOURCE = Path(__file__).parent / "csrc" / "paged_decode.cpp"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
DTYPES = {torch.float32: 0, torch.bfloat16: 1}


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
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join([source, " ".join(FLAGS).encode(), compiler.encode(), _cpu_flags().encode()])
    ).hexdigest()[:16]
    target = cache_dir() / f"paged_decode-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build under a temporary name and rename: processes building at once never load a
    # half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip()
                               else f"exit code {proc.returncode}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def paged_decode():
    """The kernel's entry point (a ctypes function), or None when it cannot be used."""
    if os.environ.get("DOCPIPE_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CXX") or shutil.which("g++")
    if compiler is None:
        logger.warning("No C++ compiler (g++ or $CXX): decode attention uses the slower "
                       "pure-torch path. Install g++ to build the native kernel.")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except Exception as exc:  # any build or load failure: fall back, say why
        logger.warning("Building the native decode kernel failed (%s); decode attention uses "
                       "the slower pure-torch path. Set DOCPIPE_NATIVE=0 to silence this.", exc)
        return None
    fn = lib.docpipe_paged_decode
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ctypes.c_int, ptr, i64, ptr, ptr, i64, ptr, i64, ptr, ptr, ptr, ptr, i64,
                   ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_float]
    fn.restype = None
    limits = lib.docpipe_paged_decode_limits
    limits.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)]
    max_group, max_dim = ctypes.c_int(), ctypes.c_int()
    limits(ctypes.byref(max_group), ctypes.byref(max_dim))
    fn.max_group, fn.max_dim = max_group.value, max_dim.value
    return fn
