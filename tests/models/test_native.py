"""The native CPU kernels (models/native.py) against the pure-torch path they replace.

The fused elementwise kernels reproduce the torch ops' roundings, so in bf16 they must give the
same bits (rarely one ulp apart: the sum of squares in RMSNorm is added in another order);
in fp32 they agree to rounding. The attention kernels are tested in
tests/models/engine/test_paged_attention.py; here also how the libraries are built.
"""

import shutil

import pytest
import torch

from models import native
from models.cpu import cpu_info
from models.layers import RMSNorm, apply_rotary, silu_mul
from tests.models.kernel_builds import BUILDS, kernel_build, skip_unless_avx2


@pytest.fixture(params=BUILDS)
def lib(request):
    """The elementwise library of each build (tests/models/kernel_builds.py)."""
    with kernel_build(request.param):
        lib = native.elementwise(torch.zeros(1))
        if lib is None:
            assert shutil.which("g++") is None, "g++ is installed but the native kernels failed"
            pytest.skip("no C++ compiler: the native kernels are not built")
        yield lib


def _torch_path(monkeypatch, fn, *args):
    with monkeypatch.context() as m:
        m.setattr(native, "library", lambda: {})
        return fn(*args)


def _check(got, want, dtype):
    if dtype == torch.bfloat16:
        ulp = (want.float().abs() * 2**-7).clamp_min(1e-30)
        diff = (got.float() - want.float()).abs()
        assert (diff <= ulp).all(), "more than one bf16 ulp apart"
        off = diff > 0
        assert off.float().mean() < 1e-3, f"{int(off.sum())} of {off.numel()} values differ"
    else:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


DTYPES = [torch.bfloat16, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,dim", [(1, 576), (333, 576), (7, 100)])
def test_rms_norm(lib, monkeypatch, dtype, rows, dim):
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(dim, 1e-5)
    norm.weight.data = (1 + 0.1 * torch.randn(dim, generator=g)).to(dtype)
    # a strided input: the rows of a wider tensor
    x = (3 * torch.randn(rows, dim + 8, generator=g)).to(dtype)[:, :dim]
    _check(norm(x), _torch_path(monkeypatch, norm, x), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inter", [(1, 1536), (257, 1536), (5, 37)])
def test_silu_mul(lib, monkeypatch, dtype, rows, inter):
    g = torch.Generator().manual_seed(1)
    gate_up = (4 * torch.randn(rows, 2 * inter, generator=g)).to(dtype)
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # saturated and zero gates
    _check(silu_mul(gate_up), _torch_path(monkeypatch, silu_mul, gate_up), dtype)


def test_bf16_rounding_keeps_denormals(lib):
    """Gates of -92 to -97 give SwiGLU values that are fp32 denormals and bf16 ones too (down to
    2^-133): the kernels round them as to_bf16() does (the hardware conversion of AVX-512 BF16
    flushes them to zero, so vectors holding one take the integer path)."""
    gates = -torch.arange(92.0, 98.0).repeat(6)  # 36 values: two full 16-lane vectors and a tail
    gate_up = torch.cat([gates, torch.ones_like(gates)]).to(torch.bfloat16).unsqueeze(0)
    g = gate_up[:, : gates.numel()].double()
    want = (g * torch.sigmoid(g)).float().to(torch.bfloat16)  # float64: no overflow in exp
    assert (want != 0).all() and (want.float().abs() < 2**-126).all()
    got = silu_mul(gate_up)
    assert (got != 0).all(), "denormal values flushed to zero"
    assert ((got.float() - want.float()).abs() <= 2**-133).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,heads,dim", [(1, 12, 64), (300, 12, 64), (9, 3, 18)])
def test_rotary(lib, monkeypatch, dtype, rows, heads, dim):
    g = torch.Generator().manual_seed(2)
    # q and k heads as attention passes them: a view into the fused qkv projection
    qkv = torch.randn(rows, (heads + 2) * dim, generator=g).to(dtype)
    x = qkv[:, : heads * dim].view(rows, heads, dim)
    angles = torch.rand(rows, dim, generator=g) * 6.3
    cos, sin = angles.cos().to(dtype).unsqueeze(1), angles.sin().to(dtype).unsqueeze(1)
    _check(apply_rotary(x, cos, sin), _torch_path(monkeypatch, apply_rotary, x, cos, sin), dtype)


def _accessors():
    return [native.paged_decode(), native.elementwise(torch.zeros(1)),
            native.prefill_attention(torch.float32, torch.float32, 64, 1),
            native.prefill_attention(torch.bfloat16, torch.bfloat16, 64, 1)]


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("DOCPIPE_NATIVE", "0")
    native.library.cache_clear()
    try:
        assert native.library() == {}
        assert all(fn is None for fn in _accessors())
    finally:
        monkeypatch.delenv("DOCPIPE_NATIVE")
        native.library.cache_clear()


def test_failed_build_falls_back_with_a_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("DOCPIPE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    native.library.cache_clear()
    try:
        assert native.library() == {}
        assert all(fn is None for fn in _accessors())
        assert "pure-torch path" in caplog.text
        for source in native.SOURCES:  # one warning per source, naming it
            assert caplog.text.count(f"csrc/{source} failed") == 1
        assert not list((tmp_path / "kernels").glob("*.so"))  # nothing half-written left
    finally:
        native.library.cache_clear()


def _compiler_or_skip():
    if native.compiler() is None:
        pytest.skip("no C++ compiler: the native kernels are not built")
    return native.compiler()


def test_one_failed_source_leaves_the_others(monkeypatch, tmp_path, caplog):
    """A source that does not compile here (say, AVX-512 BF16 intrinsics on an old g++)
    disables only its own kernels."""
    cxx = _compiler_or_skip()
    csrc = tmp_path / "csrc"
    shutil.copytree(native.CSRC, csrc)
    (csrc / "prefill_attention.cpp").write_text("#error this compiler cannot build it\n")
    monkeypatch.setattr(native, "CSRC", csrc)  # the other sources: the same cache entries
    native.library.cache_clear()
    try:
        assert sorted(native.library()) == sorted(set(native.SOURCES) - {"prefill_attention.cpp"})
        assert "csrc/prefill_attention.cpp failed" in caplog.text
        assert "this compiler cannot build it" in caplog.text
        assert "bf16 prefill attention uses the slower pure-torch path" in caplog.text
        assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 1
        # bf16 prefill is left to the AMX library where this CPU has one, else to none
        amx = native.library().get("prefill_attention_amx.cpp")
        for dim in (64, 128):
            want = amx.docpipe_prefill_attention if amx is not None and (
                amx.docpipe_prefill_supported(1, 1, dim, 1)) else None
            assert native.prefill_attention(torch.bfloat16, torch.bfloat16, dim, 1) is want
        assert native.paged_decode() is not None and native.elementwise(torch.zeros(1)) is not None
        assert not native._target("prefill_attention.cpp", cxx).exists()
    finally:
        native.library.cache_clear()


def test_each_source_is_cached_per_cpu_level(monkeypatch):
    """DOCPIPE_CPU_ISA=avx2 builds -march=x86-64-v3 libraries, one per source, cached under
    other names than this CPU's own (the key covers the flags and cpu_info().key()); loading
    again rebuilds nothing."""
    cxx = _compiler_or_skip()
    skip_unless_avx2()
    if cpu_info().detected_level == "avx2":
        pytest.skip("this CPU's own build is the x86-64-v3 one")
    targets = {}
    try:
        for level, march in (("native", "native"), ("avx2", "x86-64-v3")):
            monkeypatch.setenv("DOCPIPE_CPU_ISA", level)
            cpu_info.cache_clear()
            native.library.cache_clear()
            assert native.flags()[-1] == f"-march={march}"
            assert sorted(native.library()) == sorted(native.SOURCES)
            targets[level] = {native._target(s, cxx) for s in native.SOURCES}
            assert len(targets[level]) == len(native.SOURCES)
            assert all(t.exists() for t in targets[level])
            before = {t: t.stat().st_mtime_ns for t in targets[level]}
            native.library.cache_clear()
            assert sorted(native.library()) == sorted(native.SOURCES)
            assert {t: t.stat().st_mtime_ns for t in targets[level]} == before
        assert targets["native"].isdisjoint(targets["avx2"])
    finally:
        monkeypatch.delenv("DOCPIPE_CPU_ISA")
        cpu_info.cache_clear()
        native.library.cache_clear()


def test_baseline_build_takes_the_portable_paths(monkeypatch):
    """DOCPIPE_CPU_ISA=baseline builds every source for x86-64-v2: decode by its portable
    path (the same values), no SIMD prefill."""
    _compiler_or_skip()
    if not cpu_info().is_x86:
        pytest.skip("not an x86 CPU")
    g = torch.Generator().manual_seed(7)
    H, Hkv, D, ctx = 9, 3, 64, 45
    q = torch.randn(2, H, D, generator=g)
    k, v = torch.randn(2, Hkv, ctx, D, generator=g).unbind(0)
    tables = [torch.tensor(t, dtype=torch.int64) for t in ([1], [0, 1], [0], [ctx])]
    try:
        monkeypatch.setenv("DOCPIPE_CPU_ISA", "baseline")
        cpu_info.cache_clear()
        native.library.cache_clear()
        assert native.flags()[-1] == "-march=x86-64-v2"
        assert sorted(native.library()) == sorted(native.SOURCES)
        assert native.decode_simd_width() == 0
        assert native.decode_path(torch.float32, torch.bfloat16, 3, 64) == "portable"
        assert native.prefill_attention(torch.float32, torch.float32, 64, 3) is None
        assert native.prefill_attention(torch.bfloat16, torch.bfloat16, 64, 3) is None
        out = torch.zeros_like(q)
        assert native.paged_decode()(0, 0, q.data_ptr(), q.stride(0), k.data_ptr(), v.data_ptr(),
                                     k.stride(0), out.data_ptr(), out.stride(0),
                                     *(t.data_ptr() for t in tables), 1, H, Hkv, D, D**-0.5)
        want = torch.nn.functional.scaled_dot_product_attention(
            q[1].view(1, Hkv, H // Hkv, D), k.unsqueeze(0), v.unsqueeze(0)).view(H, D)
        torch.testing.assert_close(out[1], want, atol=1e-5, rtol=1e-5)
        assert not out[0].any()  # only the rows asked for are written
    finally:
        monkeypatch.delenv("DOCPIPE_CPU_ISA")
        cpu_info.cache_clear()
        native.library.cache_clear()
