"""dtype="auto" and kv_cache_dtype: what they resolve to on which CPU, and where the resolved
names end up (engine stats, output rows, fingerprints). Tiny random models only."""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import LLM, SamplingParams, cpu, dtypes, tiny_config
from models.layers import RotaryEmbedding
from models.loading import build_model


@pytest.fixture
def isa(monkeypatch):
    """Set DOCPIPE_CPU_ISA for one test (cpu_info is cached: cleared before and after)."""

    def set_level(level: str) -> cpu.CpuInfo:
        monkeypatch.setenv("DOCPIPE_CPU_ISA", level)
        cpu.cpu_info.cache_clear()
        return cpu.cpu_info()

    yield set_level
    monkeypatch.delenv("DOCPIPE_CPU_ISA", raising=False)
    cpu.cpu_info.cache_clear()


def test_auto_is_fp32_on_avx2_and_follows_the_cpu_natively(isa):
    if not cpu.cpu_info().is_x86 or cpu.cpu_info().detected_level in ("baseline",):
        pytest.skip("needs an x86-64 CPU with AVX2")
    native = isa("native")
    want = torch.bfloat16 if native.detected_level in ("avx512_bf16", "amx") else torch.float32
    assert dtypes.resolve_dtype("auto", "cpu") == want
    info = isa("avx2")
    assert info.forced == (info.detected_level != "avx2") and info.march in ("x86-64-v3", "native")
    assert not info.has_native_bf16
    assert dtypes.resolve_dtype("auto", "cpu") == torch.float32


def test_isa_can_only_be_lowered(isa):
    detected = cpu.cpu_info().detected_level
    if not cpu.cpu_info().is_x86 or detected == cpu.LEVELS[-1]:
        pytest.skip("nothing above this CPU's level to ask for")
    higher = cpu.LEVELS[cpu.LEVELS.index(detected) + 1]
    with pytest.raises(ValueError, match=f"DOCPIPE_CPU_ISA='{higher}'.*supports only up to"):
        isa(higher)


def test_avx512_bf16_on_an_amx_cpu_builds_without_amx(isa):
    """DOCPIPE_CPU_ISA=avx512_bf16 on a CPU with AMX: bf16 stays the default, the kernels are
    built without the AMX instructions, so bf16 prefill runs on the AVX-512 BF16 library."""
    if cpu.cpu_info().detected_level != "amx":
        pytest.skip("needs a CPU with AMX")
    info = isa("avx512_bf16")
    assert info.forced and info.has_native_bf16
    assert info.compile_flags == ["-march=native", *cpu.NO_AMX]
    assert dtypes.resolve_dtype("auto", "cpu") == torch.bfloat16
    from models import native

    native.library.cache_clear()
    try:
        avx512 = native.library()["prefill_attention.cpp"].docpipe_prefill_attention
        assert not native.library()["prefill_attention_amx.cpp"].docpipe_prefill_supported(
            1, 1, 64, 3)
        assert native.prefill_attention(torch.bfloat16, torch.bfloat16, 64, 3) is avx512
    finally:
        cpu.cpu_info.cache_clear()
        native.library.cache_clear()


def test_invalid_isa_names_the_variable(isa):
    with pytest.raises(ValueError, match="DOCPIPE_CPU_ISA='sse9'"):
        isa("sse9")


def test_explicit_bf16_without_native_bf16_warns_with_the_fix(isa, caplog):
    if not cpu.cpu_info().is_x86 or cpu.cpu_info().detected_level == "baseline":
        pytest.skip("needs an x86-64 CPU with AVX2")
    isa("avx2")
    dtypes._warn_slow_bf16.cache_clear()
    with caplog.at_level(logging.WARNING, logger="models.dtypes"):
        assert dtypes.resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert "without native bf16" in caplog.text and "--dtype auto" in caplog.text
    assert "GFLOP/s" in caplog.text  # the measured slowdown


def test_explicit_dtype_wins_over_auto(isa):
    isa("native")
    assert dtypes.resolve_dtype("float32", "cpu") == torch.float32
    assert dtypes.resolve_dtype(torch.bfloat16, "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype='int8'"):
        dtypes.resolve_dtype("int8", "cpu")


def test_cuda_auto_without_a_visible_gpu_plans_bf16():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: auto asks it")
    assert dtypes.resolve_dtype("auto", "cuda") == torch.bfloat16


def test_kv_cache_dtype_rules():
    f32, bf16 = torch.float32, torch.bfloat16
    assert dtypes.resolve_kv_cache_dtype("auto", f32) == f32
    assert dtypes.resolve_kv_cache_dtype("auto", bf16) == bf16
    assert dtypes.resolve_kv_cache_dtype("bfloat16", f32) == bf16
    with pytest.raises(ValueError, match="kv_cache_dtype=float32 with dtype=bfloat16"):
        dtypes.resolve_kv_cache_dtype("float32", bf16)
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8'"):
        dtypes.resolve_kv_cache_dtype("fp8", f32)


def test_pipeline_choices_equal_the_models_ones():
    from pipeline import config

    assert config.DTYPE_CHOICES == dtypes.CHOICES
    assert config.KV_CHOICES == dtypes.KV_CHOICES


def test_parameters_are_built_in_the_target_dtype_and_rope_stays_fp32():
    config = tiny_config()
    model = build_model(config, torch.bfloat16, "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.rotary.inv_freq.dtype == torch.float32
    # a cast afterwards (as tests and users do) must not round the RoPE frequencies either
    want = RotaryEmbedding(config).inv_freq.clone()
    model.to(torch.bfloat16)
    assert torch.equal(model.rotary.inv_freq, want)
    cos, _ = model.rotary.cos_sin(torch.tensor([2500]), torch.float32)
    angle = 2500 * want
    assert torch.allclose(cos[0, 0, : angle.numel()], angle.cos(), atol=1e-4)


def test_kv_cache_dtype_reaches_the_cache_and_the_stats():
    model = build_model(tiny_config(), torch.float32, "cpu").init_random_weights(seed=0)
    llm = LLM(model_loaded(model), kv_cache_dtype="bfloat16", kv_cache_memory_bytes=1 << 20)
    assert llm.engine.runner.kv_cache.dtype == torch.bfloat16
    stats = llm.stats()
    assert (stats["dtype"], stats["kv_cache_dtype"]) == ("float32", "bfloat16")
    same = LLM(model_loaded(model), kv_cache_memory_bytes=1 << 20)
    assert stats["kv_bytes_per_token"] * 2 == same.stats()["kv_bytes_per_token"]
    assert llm.engine.block_manager.num_blocks == 2 * same.engine.block_manager.num_blocks
    # prefill and decode through the bf16 cache give the fp32 cache's greedy tokens here
    # (K/V rounded to bf16 move these logits far less than their top-2 gaps)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompts = [[1, 2, 3, 4, 5] * 7, [9, 8, 7]]
    got = [o.token_ids for o in llm.generate(prompts, params)]
    assert got == [o.token_ids for o in same.generate(prompts, params)]


def model_loaded(model):
    from models.loading import LoadedModel

    return LoadedModel(model, None, model.config, "tiny", "0" * 64)


def test_run_config_records_resolved_dtypes(isa):
    from pipeline.config import RunConfig

    isa("native")
    auto = RunConfig()
    want = dtypes.dtype_name(dtypes.resolve_dtype("auto", "cpu"))
    assert auto.resolved_dtypes() == (want, want)
    explicit = RunConfig(dtype=want)
    assert auto.fingerprint("w", "p") == explicit.fingerprint("w", "p")
    assert RunConfig(dtype="float32", kv_cache_dtype="bfloat16").fingerprint("w", "p") != (
        RunConfig(dtype="float32").fingerprint("w", "p"))
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8'"):
        RunConfig(kv_cache_dtype="fp8")


_RSS_CHILD = """
import os, sys, torch
sys.path.insert(0, {root!r})
from tests.models.engine.helpers import make_engine, tiny_model
make_engine(tiny_model())  # the engine's runner sets the allocator up
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
x = torch.ones(6 << 20)  # 24 MiB of fp32: a prefill activation's size
touched = rss()
del x
print(touched - rss())
"""


@pytest.mark.skipif(platform.system() != "Linux", reason="glibc's mallopt")
@pytest.mark.parametrize("keep", ["1", "0"])
def test_engines_keep_freed_activation_memory(keep):
    """An engine on CPU makes malloc keep a freed activation-sized buffer in the process for
    the next one (its pages stay resident: no page faults and zeroing when the next layer
    allocates); DOCPIPE_KEEP_FREED_MEMORY=0 leaves glibc's default, which unmaps it at free.
    Child processes: the setting is process-wide."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, DOCPIPE_KEEP_FREED_MEMORY=keep)
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD.format(root=root)],
                         env=env, capture_output=True, text=True, timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    released = int(out.stdout.split()[-1])
    if keep == "1":
        assert released < 4 << 20, f"{released >> 20} MiB went back to the OS at free"
    else:
        assert released > 20 << 20, f"only {released >> 20} MiB went back: glibc's default unmaps"
