"""What this machine's CPU can do: its model name, feature flags and instruction-set level.

docpipe's choices that depend on the CPU (the default compute dtype, which native kernel paths
are built) all read `cpu_info()`, so one setting steers them together:

    DOCPIPE_CPU_ISA=avx2          behave as on an AVX2 + FMA CPU (x86-64-v3): fp32 by default,
                                  kernels built with -march=x86-64-v3
    DOCPIPE_CPU_ISA=avx512        AVX-512 without bf16 dot products (x86-64-v4)
    DOCPIPE_CPU_ISA=avx512_bf16   on a CPU with AMX: as without it (kernels built with
                                  -march=native -mno-amx-*: the AVX-512 BF16 ones)
    DOCPIPE_CPU_ISA=baseline      no AVX2 (kernels built for x86-64-v2: their portable paths)
    DOCPIPE_CPU_ISA=native        (default) what the CPU has

A level can only be lowered: asking for more than the CPU has is an error. The variable does
not change PyTorch's own kernels; benchmarks emulate an AVX2 machine fully by also setting
ONEDNN_MAX_CPU_ISA=AVX2, ATEN_CPU_CAPABILITY=avx2 and MKL_ENABLE_INSTRUCTIONS=AVX2
(`isa_environment("avx2")`) in the process they start.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

# x86 levels in order; each includes the ones before it.
LEVELS = ("baseline", "avx2", "avx512", "avx512_bf16", "amx")
# -march for a forced level (native: the compiler's own detection); baseline: x86-64-v2 (SSE4.2,
# no AVX), so the kernels build their portable paths; avx512_bf16 (below amx): native without the
# AMX instructions.
MARCH = {"baseline": "x86-64-v2", "avx2": "x86-64-v3", "avx512": "x86-64-v4"}
NO_AMX = ("-mno-amx-tile", "-mno-amx-bf16", "-mno-amx-int8")
RELEVANT_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


@dataclass(frozen=True, slots=True)
class CpuInfo:
    model: str  # "AMD EPYC 7B13", or platform.processor() where /proc/cpuinfo has no name
    arch: str  # platform.machine(): x86_64, aarch64, arm64, ...
    flags: frozenset[str]  # x86 `flags` or arm `Features` of /proc/cpuinfo
    level: str  # one of LEVELS (x86), "baseline" elsewhere; after DOCPIPE_CPU_ISA
    detected_level: str  # before DOCPIPE_CPU_ISA

    @property
    def is_x86(self) -> bool:
        return self.arch in ("x86_64", "AMD64", "i686", "i386")

    @property
    def forced(self) -> bool:
        return self.level != self.detected_level

    @property
    def has_native_bf16(self) -> bool:
        """bf16 dot products in hardware (AVX-512 BF16 or AMX on x86, BF16 on Arm): where
        PyTorch's bf16 GEMMs are fast. Elsewhere they run an order of magnitude slower than
        fp32 (measured on Zen 3: 1 against 140 GFLOP/s)."""
        if self.is_x86:
            return self.level in ("avx512_bf16", "amx")
        return "bf16" in self.flags and not self.forced

    @property
    def march(self) -> str:
        """The compiler's -march for the native kernels."""
        return MARCH.get(self.level, "native") if self.forced else "native"

    @property
    def compile_flags(self) -> list[str]:
        """-march, and for a forced avx512_bf16 level the AMX instructions taken away."""
        no_amx = list(NO_AMX) if self.forced and self.level == "avx512_bf16" else []
        return [f"-march={self.march}", *no_amx]

    def describe(self) -> str:
        """One line for logs and benchmark headers: model, relevant flags, level."""
        if self.is_x86:
            have = [f for f in RELEVANT_FLAGS if f in self.flags]
            lack = [f for f in RELEVANT_FLAGS if f not in self.flags]
            flags = " ".join(have) + (f"; no {' '.join(lack)}" if lack else "")
        else:
            flags = "bf16" if "bf16" in self.flags else "no bf16"
        level = self.level + (f" (forced by DOCPIPE_CPU_ISA; detected {self.detected_level})"
                              if self.forced else "")
        return f"{self.model} [{self.arch}; {flags}]; ISA level {level}"

    def key(self) -> str:
        """What native builds depend on: arch, flags, level (for the kernel cache key)."""
        return f"{self.arch}|{self.level}|{' '.join(sorted(self.flags))}"


def _read_cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = "", frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU", flags
    for line in text.splitlines():
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
        elif name in ("flags", "features") and not flags:
            flags = frozenset(value.split())
    return model or platform.processor() or "unknown CPU", flags


def _detect_level(arch: str, flags: frozenset[str]) -> str:
    if arch not in ("x86_64", "AMD64"):
        return "baseline"
    if {"avx512f", "avx512bw", "avx512vl"} <= flags:
        if {"amx_bf16", "amx_tile"} <= flags:
            return "amx"
        return "avx512_bf16" if "avx512_bf16" in flags else "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return "baseline"


@functools.cache
def cpu_info() -> CpuInfo:
    model, flags = _read_cpuinfo()
    arch = platform.machine()
    detected = _detect_level(arch, flags)
    wanted = os.environ.get("DOCPIPE_CPU_ISA", "native").strip().lower() or "native"
    if wanted == "native":
        return CpuInfo(model, arch, flags, detected, detected)
    if wanted not in LEVELS or arch not in ("x86_64", "AMD64"):
        raise ValueError(f"DOCPIPE_CPU_ISA={wanted!r} is not valid here; use native, or on "
                         f"x86-64 one of {', '.join(LEVELS)}")
    if LEVELS.index(wanted) > LEVELS.index(detected):
        raise ValueError(f"DOCPIPE_CPU_ISA={wanted!r}: this CPU ({model}) supports only up to "
                         f"{detected}; unset the variable or choose a lower level")
    return CpuInfo(model, arch, flags, wanted, detected)


def isa_environment(level: str) -> dict[str, str]:
    """Environment variables that make a new process behave as on a CPU of `level`
    (docpipe's choices and PyTorch's own kernels); empty for "native"."""
    if level == "native":
        return {}
    env = {"DOCPIPE_CPU_ISA": level}
    if level == "avx2":
        env |= {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    elif level == "avx512":
        env |= {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "ATEN_CPU_CAPABILITY": "avx512"}
    elif level == "avx512_bf16":
        env |= {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "ATEN_CPU_CAPABILITY": "avx512"}
    return env


# glibc mallopt parameters: freed blocks below the mmap threshold go back to the heap, and
# the heap's top is returned to the OS only past the trim threshold.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
KEEP_FREED = {_M_MMAP_THRESHOLD: 32 << 20, _M_TRIM_THRESHOLD: 512 << 20, _M_TOP_PAD: 64 << 20}


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed activation buffers for reuse instead of returning them
    to the OS; True where it took effect (Linux with glibc, unless DOCPIPE_KEEP_FREED_MEMORY=0).

    A forward pass allocates and frees the same few-MB activation tensors layer after layer.
    By default glibc serves them with mmap (or trims them off the heap's top) and gives them
    back at free, so every layer's next allocation page-faults and the kernel zeroes its
    pages again. Allocations up to 32 MiB now come from the heap, which keeps up to 512 MiB
    free at its top. Measured on SmolLM2, 2048-token bf16 prefills (Xeon with AMX, 2
    threads, processes alternated): 3,300-36,000 page faults per pass (13-140 MiB zeroed
    again) -> 0-315; the time per pass moved within this shared host's noise.
    What it costs: up to that much freed memory stays in the process's RSS. Buffers over
    32 MiB (KV caches, weights) are still mapped and unmapped as before."""
    if os.environ.get("DOCPIPE_KEEP_FREED_MEMORY", "1") == "0" or platform.system() != "Linux":
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    return all(mallopt(param, value) == 1 for param, value in KEEP_FREED.items())
