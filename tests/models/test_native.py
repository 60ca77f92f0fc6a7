"""The native CPU kernels (models/native.py) against the pure-torch path they replace.

The fused elementwise kernels reproduce the torch ops' roundings, so in bf16 they must give the
same bits (rarely one ulp apart: the sum of squares in RMSNorm is added in another order);
in fp32 they agree to rounding. The decode-attention kernel is tested in
tests/models/engine/test_paged_attention.py.
"""

import shutil

import pytest
import torch

from models import native
from models.layers import RMSNorm, apply_rotary, silu_mul


@pytest.fixture
def lib():
    lib = native.library()
    if lib is None:
        assert shutil.which("g++") is None, "g++ is installed but the native kernels failed"
        pytest.skip("no C++ compiler: the native kernels are not built")
    return lib


def _torch_path(monkeypatch, fn, *args):
    with monkeypatch.context() as m:
        m.setattr(native, "library", lambda: None)
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


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("DOCPIPE_NATIVE", "0")
    native.library.cache_clear()
    try:
        assert native.library() is None and native.paged_decode() is None
    finally:
        monkeypatch.delenv("DOCPIPE_NATIVE")
        native.library.cache_clear()


def test_failed_build_falls_back_with_a_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("DOCPIPE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    native.library.cache_clear()
    try:
        assert native.library() is None
        assert "pure-torch path" in caplog.text
        assert not list((tmp_path / "kernels").glob("*.so"))  # nothing half-written left
    finally:
        native.library.cache_clear()
