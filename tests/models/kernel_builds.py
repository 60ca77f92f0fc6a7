"""The native kernels as a test builds them: for this CPU, or for x86-64-v3 (the build an
AVX2 + FMA machine gets), so an AVX-512 machine tests the AVX2 paths too."""

import contextlib

import pytest

from models import native
from models.cpu import LEVELS, cpu_info

BUILDS = ["native", "x86-64-v3"]


def reset_kernels() -> None:
    cpu_info.cache_clear()
    native.clear_cache()


def skip_unless_avx2() -> None:
    """Skips unless this CPU can run the x86-64-v3 build (x86 with AVX2 + FMA)."""
    info = cpu_info()
    if not info.is_x86 or LEVELS.index(info.detected_level) < LEVELS.index("avx2"):
        pytest.skip("not an x86 CPU with AVX2 + FMA")


@contextlib.contextmanager
def kernel_build(build: str):
    """Within: `native` builds and loads the kernels for `build` ("native", or "x86-64-v3":
    DOCPIPE_CPU_ISA=avx2). Skips where the CPU cannot run that build, or where the native
    build already is the x86-64-v3 one; the loaded libraries are forgotten on entry and exit."""
    if build == "x86-64-v3":
        skip_unless_avx2()
        if cpu_info().level == "avx2":
            pytest.skip("the native build is already the x86-64-v3 one")
    with pytest.MonkeyPatch.context() as mp:
        if build == "x86-64-v3":
            mp.setenv("DOCPIPE_CPU_ISA", "avx2")
        reset_kernels()
        try:
            if build == "x86-64-v3":
                assert native.flags()[-1] == "-march=x86-64-v3"
            yield
        finally:
            mp.undo()
            reset_kernels()
