"""One settings schema: RunConfig, the CLI options, the job-file schema and the fingerprint
all come from pipeline.settings.SETTINGS."""

import dataclasses

import pytest
from click.testing import CliRunner

from jobs.cli import main
from jobs.spec import JobSpecError, parse_job
from pipeline.config import RunConfig
from pipeline.settings import SETTINGS, SettingError


def _changed(s, current=None):
    """A valid value other than `current` (default: the setting's default)."""
    current = s.default if current is None else current
    if s.name == "kv_cache_dtype":  # float32 would be the float32 compute dtype's own cache
        return "bfloat16"
    if s.choices:
        return next(c for c in s.choices if c not in (current, "auto", "float16"))
    return {bool: lambda d: not d, int: lambda d: (d or 0) + 7 if s.name != "chunk_tokens" else 4096,
            float: lambda d: d + 0.5, str: lambda d: "x"}[s.type](current)


def test_every_setting_is_a_field_an_option_and_a_job_key(tmp_path):
    fields = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    help_text = CliRunner().invoke(main, ["run", "-h"]).output
    for s in SETTINGS:
        assert fields[s.name] == s.default, s.name
        option = {"use_ray": "--ray/--no-ray", "kv_cache_memory_bytes": "--kv-cache-memory"}.get(
            s.name, s.option)
        assert option.split("/")[0] in help_text, s.name
        # the job file key sets the field
        raw = {"input": {"path": "d"}, "output": {"path": "o"}, s.section: {s.job_key: _changed(s)}}
        if s.name == "overlap":
            raw["chunking"]["chunk_tokens"] = 4096
        if s.name in ("max_num_seqs",):
            raw.setdefault("engine", {})["max_num_batched_tokens"] = 4096
        spec = parse_job(raw, tmp_path / "j.toml")
        assert getattr(spec.run, s.name) == _changed(s), s.name


def test_fingerprint_covers_exactly_the_output_settings():
    base = RunConfig(dtype="float32", chunk_tokens=4096, max_num_batched_tokens=4096)
    fp = base.fingerprint("w", "p")
    for s in SETTINGS:
        if s.name in ("chunk_tokens", "max_num_batched_tokens"):
            continue
        other = dataclasses.replace(base, **{s.name: _changed(s, getattr(base, s.name))})
        changed = other.fingerprint("w", "p") != fp
        assert changed == s.output, f"{s.name}: output={s.output} but fingerprint changed={changed}"


def test_one_pool_fingerprint_is_unchanged_by_the_pool_spelling():
    plain = RunConfig(model="m", dtype="float32")
    pooled = RunConfig(pools=[{"name": "default", "model": "m", "dtype": "float32"}])
    assert plain.fingerprint("w", "p") == pooled.fingerprint("w", "p")
    two = RunConfig(dtype="float32", pools=[{"name": "a", "model": "m"}, {"name": "b", "model": "m"}])
    routed = dataclasses.replace(two, routes=["stage == reduce -> b"])
    assert two.fingerprint({"a": "w", "b": "w"}, "p") != routed.fingerprint({"a": "w", "b": "w"}, "p")
    assert two.fingerprint({"a": "w", "b": "w"}, "p") != two.fingerprint({"a": "w", "b": "v"}, "p")


def test_pools_inherit_the_top_level_and_validate():
    config = RunConfig(model="m", workers=2, max_num_seqs=8, pools=[
        {"name": "a"}, {"name": "b", "model": "n", "workers": 1, "dtype": "float32"}])
    a, b = config.pool_configs()
    assert (a.name, a.model, a.workers, a.max_num_seqs) == ("a", "m", 2, 8)
    assert (b.model, b.workers, b.dtype) == ("n", 1, "float32")
    with pytest.raises(ValueError, match=r"pool 'b': workers=0: must be at least 1"):
        RunConfig(pools=[{"name": "a"}, {"name": "b", "workers": 0}])


def test_alignment_has_one_home():
    from models.engine.engine import PREFILL_ALIGN_TOKENS, EngineConfig
    from pipeline.settings import min_batched_tokens

    assert EngineConfig().prefill_align_tokens == PREFILL_ALIGN_TOKENS
    assert min_batched_tokens(64) == PREFILL_ALIGN_TOKENS + 63
    with pytest.raises(SettingError, match=f"at least {PREFILL_ALIGN_TOKENS + 63}"):
        RunConfig(max_num_batched_tokens=PREFILL_ALIGN_TOKENS + 62)


def test_job_file_names_the_key_of_a_bad_value(tmp_path):
    with pytest.raises(JobSpecError, match=r"engine\.max_num_seqs = 0: must be at least 1$"):
        parse_job({"input": {"path": "d"}, "output": {"path": "o"},
                   "engine": {"max_num_seqs": 0}}, tmp_path / "j.toml")


@pytest.mark.parametrize("text, want", [("2GiB", 2 * 2**30), ("512 MiB", 512 * 2**20),
                                        ("1.5GB", 1_500_000_000), ("4096", 4096)])
def test_kv_cache_memory_takes_units(text, want):
    from pipeline.cli import ByteSize

    assert ByteSize().convert(text, None, None) == want


def test_bad_kv_cache_memory_is_one_error(tmp_path):
    result = CliRunner().invoke(main, ["run", str(tmp_path), "-o", str(tmp_path / "o.parquet"),
                                       "--kv-cache-memory", "lots"])
    assert result.exit_code == 2 and "is not a size; write e.g. 2GiB" in result.output


def test_unset_strategy_and_chunking_take_the_models_recommendation():
    """strategy "auto", chunk_tokens / overlap unset: the model's row of MODEL_RECOMMENDED
    (the first pool's model), GENERIC_RECOMMENDED for any other; explicit values win; the
    fingerprint sees the resolved values."""
    from pipeline.settings import GENERIC_RECOMMENDED, MODEL_RECOMMENDED, recommended

    name, rec = next(iter(MODEL_RECOMMENDED.items()))
    assert rec != GENERIC_RECOMMENDED
    run = RunConfig(model=name)
    got = {k: getattr(run, k) for k in GENERIC_RECOMMENDED}
    assert got == recommended(name) == {**GENERIC_RECOMMENDED, **rec}
    other = RunConfig(model="some/other/model.gguf")
    assert {k: getattr(other, k) for k in GENERIC_RECOMMENDED} == GENERIC_RECOMMENDED
    explicit = RunConfig(model=name, **GENERIC_RECOMMENDED)
    assert {k: getattr(explicit, k) for k in GENERIC_RECOMMENDED} == GENERIC_RECOMMENDED
    assert run.fingerprint("w", "p") == RunConfig(model=name, **recommended(name)).fingerprint("w", "p")
    assert run.fingerprint("w", "p") != explicit.fingerprint("w", "p")
    # a small explicit chunk size keeps the default overlap valid
    assert RunConfig(model="m", chunk_tokens=100).overlap == 49
    # pools: the first pool's model decides
    pooled = RunConfig(pools=[{"name": "a", "model": name}, {"name": "b", "model": "m"}])
    assert pooled.strategy == recommended(name)["strategy"]
    pooled = RunConfig(pools=[{"name": "b", "model": "m"}, {"name": "a", "model": name}])
    assert pooled.strategy == GENERIC_RECOMMENDED["strategy"]
