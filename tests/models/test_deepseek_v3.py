"""deepseek_v3 against transformers' DeepseekV3ForCausalLM, fp32, tiny random checkpoints:
multi-head latent attention (with and without q_lora_rank, interleaved and half-split rope),
YaRN with its softmax-scale and cos/sin corrections, dense-first layers and the V3 MoE with
group-limited routing and a selection bias.

Full-forward logits within 1e-4 of transformers and each feature shown to move them (so the
parity test guards it); the absorbed decode form equals the plain one; the engine over the
paged latent cache gives the one-sequence greedy tokens (and transformers' generate) batched,
with prefix caching on and off, chunked, after preemption and batch-invariant; the cache holds
num_layers x (kv_lora_rank + qk_rope_head_dim) values per token, which stats() reports and the
memory budget counts.
"""

from __future__ import annotations

import pytest
import torch

from models.attention import AttentionMetadata, SeqSpan
from models.config import ModelConfig, tiny_config
from models.engine.sampling import SamplingParams
from models.errors import ModelLoadError
from models.loading import load_model
from models.mla import MLAttention
from tests.models.engine.helpers import greedy_reference, make_engine, run_all, tiny_model
from tests.models.hf_reference import assert_breakage_moves_logits

_YARN = dict(rope_type="yarn", rope_theta=10_000.0, factor=4.0,
             original_max_position_embeddings=128, beta_fast=32, beta_slow=1,
             mscale=0.9, mscale_all_dim=0.7)  # mscale != mscale_all_dim: both corrections show
_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
             n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
             kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
             max_position_embeddings=512, eos_token_id=None, bos_token_id=None,
             pad_token_id=None)
VARIANTS = {
    # q through a LoRA (q_a_proj, q_a_layernorm, q_b_proj), YaRN, interleaved rope (the
    # config default), 1 dense layer, 2 of 4 expert groups
    "q_lora_yarn": dict(q_lora_rank=48, rope_parameters=_YARN, first_k_dense_replace=1,
                        n_group=4, topk_group=2, routed_scaling_factor=2.5),
    # one q_proj, plain rope, half-split rope dims, 2 dense layers, 1 of 2 groups
    "no_q_lora": dict(q_lora_rank=None, rope_interleave=False, first_k_dense_replace=2,
                      n_group=2, topk_group=1, routed_scaling_factor=1.5, norm_topk_prob=False),
}
SEQ_LEN = 40
PROMPT_LENS = [5, 23, 70]
NUM_NEW = 12


def make_checkpoint(variant: str, path, seed: int = 0):
    """Save a random DeepseekV3ForCausalLM (weights and selection biases perturbed) to
    `path`; return it (fp32, eval, eager attention)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("deepseek_v3", **{**_TINY, **VARIANTS[variant]})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if "norm" in name else 0.05))
        for layer in model.model.layers[config.first_k_dense_replace:]:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(config.n_routed_experts) * 0.1)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    model.eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {v: (p, make_checkpoint(v, p)) for v in VARIANTS
            for p in [tmp_path_factory.mktemp(v)]}


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(checkpoints, variant):
    path, ref = checkpoints[variant]
    model = load_model(path, dtype="float32").model
    c = model.config
    assert [layer.is_moe for layer in model.layers] == [
        i >= ref.config.first_k_dense_replace for i in range(c.num_hidden_layers)]
    ids = _ids(2, SEQ_LEN, 1)
    with torch.no_grad():
        want = ref(ids).logits
    torch.testing.assert_close(model.logits_dense(ids), want, atol=1e-4, rtol=1e-4)


# -- each feature changes the output (the parity test above would catch its loss) ----------
def _no_mscale(model):
    c = model.config
    for layer in model.layers:
        layer.self_attn.scale = (c.qk_nope_head_dim + c.qk_rope_head_dim) ** -0.5


def _no_rope_attention_factor(model):
    model.rotary.attention_scaling, model.rotary._cos_sin = 1.0, None


def _no_yarn(model):
    from models.layers import RotaryEmbedding

    model.rotary = RotaryEmbedding(ModelConfig(**{**model.config.to_dict(), "rope_scaling": None}))


def _flip_interleave(model):
    for layer in model.layers:
        layer.self_attn.interleave = not layer.self_attn.interleave


def _no_selection_bias(model):
    for layer in model.layers:
        if layer.is_moe:
            layer.mlp.has_selection_bias = False


def _no_group_limit(model):
    for layer in model.layers:
        if layer.is_moe:
            layer.mlp.n_group = layer.mlp.topk_group = 1


def _no_routed_scaling(model):
    for layer in model.layers:
        if layer.is_moe:
            layer.mlp.routed_scaling_factor = 1.0


def _no_q_lora_norm(model):
    for layer in model.layers:
        layer.self_attn.q_a_layernorm.forward = lambda x: x


def _no_kv_norm(model):
    for layer in model.layers:
        layer.self_attn.kv_a_layernorm.forward = lambda x: x


@pytest.mark.parametrize(("variant", "breakage"), [
    ("q_lora_yarn", _no_mscale),
    ("q_lora_yarn", _no_rope_attention_factor),
    ("q_lora_yarn", _no_yarn),
    ("q_lora_yarn", _flip_interleave),
    ("no_q_lora", _flip_interleave),
    ("q_lora_yarn", _no_selection_bias),
    ("q_lora_yarn", _no_group_limit),
    ("no_q_lora", _no_group_limit),
    ("q_lora_yarn", _no_routed_scaling),
    ("q_lora_yarn", _no_q_lora_norm),
    ("no_q_lora", _no_kv_norm),
], ids=lambda x: getattr(x, "__name__", x))
def test_each_feature_changes_the_output(checkpoints, variant, breakage):
    path, ref = checkpoints[variant]
    assert_breakage_moves_logits(path, ref, breakage, SEQ_LEN)


# -- the absorbed decode form equals the plain form ----------------------------------------
def _mla_layer(q_lora_rank=None, seed=0) -> tuple[MLAttention, ModelConfig]:
    config = tiny_config("deepseek_v3", num_hidden_layers=1, q_lora_rank=q_lora_rank)
    attn = MLAttention(config, 0)
    gen = torch.Generator().manual_seed(seed)
    for name, param in attn.named_parameters():
        base = 1.0 if "layernorm" in name else 0.0
        param.data.copy_(base + torch.randn(param.shape, generator=gen) * 0.3)
    return attn, config


def _paged_outputs(attn, x, cos, sin, num_new: int, absorb: bool) -> torch.Tensor:
    """Positions [0, ctx - num_new) cached in one step, then the rest one token a step (each a
    single-query group), K/V in two runs of cache slots."""
    ctx = x.shape[0]
    cache = torch.zeros(1, 512, attn.kv_lora_rank + attn.rope_dim)
    kv_cache = (cache, cache[..., :0])
    half = ctx // 2
    runs = [slice(100, 100 + half), slice(300, 300 + ctx - half)]
    slots = torch.cat([torch.arange(r.start, r.stop) for r in runs])
    attn.absorb = absorb
    got = torch.empty(ctx, attn.o_proj.weight.shape[0])
    steps = [(0, ctx - num_new)] + [(p, p + 1) for p in range(ctx - num_new, ctx)]
    for lo, hi in steps:
        kv_slots = [slice(r.start, min(r.stop, r.start + hi - pos)) for r, pos in
                    zip(runs, (0, half), strict=True) if hi > pos]
        meta = AttentionMetadata([SeqSpan(0, hi - lo, hi, 0, kv_slots)], slot_mapping=slots[lo:hi])
        got[lo:hi] = attn(x[lo:hi], cos[lo:hi], sin[lo:hi], meta, kv_cache)
    attn.absorb = True
    return got


@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_absorbed_decode_equals_plain(q_lora_rank):
    from models.layers import RotaryEmbedding

    attn, config = _mla_layer(q_lora_rank)
    ctx, num_new = 40, 8
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(ctx, config.hidden_size, generator=gen)
    cos, sin = RotaryEmbedding(config).cos_sin(torch.arange(ctx), x.dtype)
    with torch.no_grad():
        dense = attn(x, cos, sin, AttentionMetadata.for_dense([ctx]), None)  # plain, no cache
        absorbed = _paged_outputs(attn, x, cos, sin, num_new, absorb=True)
        plain = _paged_outputs(attn, x, cos, sin, num_new, absorb=False)
    torch.testing.assert_close(plain, dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(absorbed, plain, atol=1e-5, rtol=1e-5)
    # the absorbed rows really took the other path (not bit-equal to the plain ones)
    assert not torch.equal(absorbed[-num_new:], plain[-num_new:])


def test_absorbed_decode_is_batch_invariant():
    """A decode row's output is the same bits whatever other decode rows share the step
    (batch-invariant metadata: projections and per-head matmuls in fixed row groups)."""
    from models.layers import RotaryEmbedding

    attn, config = _mla_layer(24)
    gen = torch.Generator().manual_seed(2)
    cache = torch.randn(1, 512, attn.kv_lora_rank + attn.rope_dim, generator=gen)
    x = torch.randn(7, config.hidden_size, generator=gen)
    rope = RotaryEmbedding(config)

    def decode(num_rows: int) -> torch.Tensor:
        spans = [SeqSpan(i, i + 1, 20 + 3 * i, 0, [slice(48 * i, 48 * i + 20 + 3 * i)],
                         prompt_len=10) for i in range(num_rows)]
        positions = torch.tensor([s.context_len - 1 for s in spans])
        slots = torch.tensor([s.kv_slots[0].stop - 1 for s in spans])
        cos, sin = rope.cos_sin(positions, x.dtype)
        meta = AttentionMetadata(spans, slot_mapping=slots, align=16)
        with torch.no_grad():
            return attn(x[:num_rows], cos, sin, meta, (cache.clone(), cache[..., :0]))

    alone, batched = decode(1), decode(7)
    assert torch.equal(alone[0], batched[0])


# -- the engine over the paged latent cache ------------------------------------------------
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine_case(checkpoints):
    path, _ = checkpoints["q_lora_yarn"]
    model = load_model(path, dtype="float32").model
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (3, 9, 23, 38, 51)]
    prompts += [prompts[3] + [5, 6, 7] * 6, prompts[3][:21]]  # shared prefixes
    refs = [greedy_reference(model, p, GREEDY.max_tokens) for p in prompts]
    return model, prompts, refs


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_batched_equals_sequential(engine_case, prefix_caching):
    model, prompts, refs = engine_case
    engine = make_engine(model, block_size=4, max_num_batched_tokens=48,
                         enable_prefix_caching=prefix_caching)
    outs = run_all(engine, prompts, GREEDY)
    assert [o.token_ids for o in outs] == refs
    if prefix_caching:
        assert any(o.num_cached_tokens for o in outs)
    else:
        assert not any(o.num_cached_tokens for o in outs)


def test_preemption_recomputes_the_same_tokens(engine_case):
    model, prompts, refs = engine_case
    # 30 blocks of 4 tokens: too few for all at once, enough for the longest (51 + 16).
    engine = make_engine(model, num_blocks=30, block_size=4, max_num_batched_tokens=32,
                         reserve_decode_blocks=False)
    outs = run_all(engine, prompts, GREEDY)
    assert engine.stats()["num_preemptions"] > 0
    assert any(o.num_preemptions for o in outs)
    assert [o.token_ids for o in outs] == refs
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_batch_invariant_engine(engine_case):
    model, prompts, refs = engine_case
    engine = make_engine(model, block_size=4, max_num_batched_tokens=48, max_num_seqs=8,
                         batch_invariant=True, prefill_align_tokens=16)
    outs = run_all(engine, prompts, GREEDY)
    assert [o.token_ids for o in outs] == refs


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_engine_greedy_matches_transformers_generate(checkpoints, variant):
    path, ref = checkpoints[variant]
    prompts = [_ids(1, n, 10 + n)[0].tolist() for n in PROMPT_LENS]
    want = []
    for p in prompts:
        with torch.no_grad():
            out = ref.generate(torch.tensor([p]), max_new_tokens=NUM_NEW, do_sample=False,
                               attention_mask=torch.ones(1, len(p), dtype=torch.long))
        want.append(out[0, len(p):].tolist())
    model = load_model(path, dtype="float32").model
    engine = make_engine(model, block_size=4, max_num_batched_tokens=24)  # chunked prefill
    outs = run_all(engine, prompts, SamplingParams(max_tokens=NUM_NEW, temperature=0.0,
                                                   ignore_eos=True))
    assert [o.token_ids for o in outs] == want


# -- the latent cache: layout, bytes per token, budget ------------------------------------
def test_latent_cache_bytes_per_token(checkpoints):
    from models import LLM

    path, _ = checkpoints["no_q_lora"]
    budget = 1 << 20
    llm = LLM(str(path), dtype="float32", kv_cache_memory_bytes=budget, block_size=16)
    c = llm.loaded.config
    per_token = c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * 4
    stats = llm.stats()
    assert stats["kv_bytes_per_token"] == per_token == 3 * 40 * 4
    runner = llm.engine.runner
    num_blocks = budget // (per_token * 16)
    assert stats["num_blocks"] == num_blocks
    cache = runner.group_kv_caches[0]
    assert cache.shape == (3, 1, 1, num_blocks * 16, 40)
    assert all(v.numel() == 0 for _, v in runner.kv_caches)  # no V copy
    assert cache.numel() * cache.element_size() == num_blocks * 16 * per_token
    # a GQA model of the same width holds 2 x layers x kv heads x head_dim per token
    gqa = tiny_model("llama", num_hidden_layers=3, num_key_value_heads=2)
    gqa_engine = make_engine(gqa, num_blocks=1)
    assert gqa_engine.stats()["kv_bytes_per_token"] == 2 * 3 * 2 * 16 * 4 > per_token
    out, = llm.generate([[3, 4, 5, 6]], SamplingParams(max_tokens=4, ignore_eos=True))
    assert out.num_generated_tokens == 4


# -- config mapping and loading ------------------------------------------------------------
def test_hub_config_maps():
    """DeepSeek's own config.json shape: legacy rope_scaling (type yarn), no rope_interleave,
    a scoring_func / topk_method that transformers ignores."""
    raw = {"model_type": "deepseek_v3", "hidden_size": 64, "num_attention_heads": 4,
           "num_key_value_heads": 4, "num_hidden_layers": 4, "vocab_size": 256,
           "intermediate_size": 96, "moe_intermediate_size": 16, "n_routed_experts": 8,
           "num_experts_per_tok": 2,
           "n_group": 4, "topk_group": 2, "first_k_dense_replace": 2, "q_lora_rank": None,
           "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 12,
           "scoring_func": "softmax", "topk_method": "greedy",
           "rope_scaling": {"type": "yarn", "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                            "original_max_position_embeddings": 4096}}
    c = ModelConfig.from_hf_dict(raw)
    assert c.is_mla and c.rope_interleave and c.q_lora_rank is None and c.head_dim == 8
    assert (c.scoring_func, c.topk_method, c.num_local_experts) == ("sigmoid", "noaux_tc", 8)
    assert c.shared_expert_intermediate_size == 16 and not c.shared_expert_gated
    assert [c.is_moe_layer(i) for i in range(4)] == [False, False, True, True]
    assert c.kv_cache_entry == (1, 1, 40) and c.rope_scaling["rope_type"] == "yarn"
    from models.mla import mla_scale

    m = 0.1 * 1.0 * torch.log(torch.tensor(40.0)).item() + 1.0
    assert mla_scale(c) == pytest.approx(24**-0.5 * m * m)


def test_yarn_only_for_mla_and_mla_fields_checked():
    with pytest.raises(ModelLoadError, match="rope_scaling type 'yarn' is not supported for llama"):
        ModelConfig.from_hf_dict({"model_type": "llama", "num_hidden_layers": 2,
                                  "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ModelLoadError, match="v_head_dim=0 must be positive"):
        ModelConfig.from_hf_dict({"model_type": "deepseek_v3", "v_head_dim": 0})
    with pytest.raises(ModelLoadError, match="quantization_config 'fp8' is not supported"):
        ModelConfig.from_hf_dict({"model_type": "deepseek_v3", "quantization_config": {
            "quant_method": "fp8", "weight_block_size": [128, 128]}})


def test_mtp_layers_are_skipped(checkpoints, tmp_path):
    """DeepSeek-V3 checkpoints carry a multi-token-prediction layer past num_hidden_layers."""
    import shutil

    from safetensors.torch import save_file

    path, ref = checkpoints["no_q_lora"]
    copy = tmp_path / "with_mtp"
    shutil.copytree(path, copy)
    n = ref.config.num_hidden_layers
    save_file({f"model.layers.{n}.eh_proj.weight": torch.zeros(64, 128),
               f"model.layers.{n}.self_attn.kv_b_proj.weight": torch.zeros(112, 32)},
              str(copy / "mtp.safetensors"))
    model = load_model(copy, dtype="float32").model
    ids = _ids(1, 12, 4)
    with torch.no_grad():
        torch.testing.assert_close(model.logits_dense(ids), ref(ids).logits, atol=1e-4, rtol=1e-4)


def test_bf16_latent_cache_and_bf16_compute(checkpoints):
    """kv_cache_dtype bfloat16 under fp32 halves the latent bytes; a bf16 model runs the
    paged engine (both forms) and stays near the fp32 logits."""
    path, _ = checkpoints["q_lora_yarn"]
    fp32 = load_model(path, dtype="float32").model
    bf16 = load_model(path, dtype="bfloat16").model
    ids = _ids(1, 30, 5)
    # bf16 rounding can flip a near-tie expert choice of a token (routing is discrete), which
    # moves that token's logits by more: most logits stay within 0.1, on average far less
    diff = (bf16.logits_dense(ids) - fp32.logits_dense(ids)).abs()
    assert float((diff > 0.1).float().mean()) < 0.05 and float(diff.mean()) < 0.02, diff.max()
    prompts = [ids[0].tolist(), ids[0, :11].tolist()]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    half = make_engine(fp32, kv_cache_dtype="bfloat16")
    assert half.stats()["kv_bytes_per_token"] == make_engine(fp32).stats()["kv_bytes_per_token"] // 2
    for engine in (half, make_engine(bf16, block_size=4, max_num_batched_tokens=16)):
        outs = run_all(engine, prompts, params)
        assert [o.num_generated_tokens for o in outs] == [6, 6]
