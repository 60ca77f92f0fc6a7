"""qwen3, qwen3_moe and gemma3 (text) against transformers, fp32, tiny random checkpoints.

Full-forward logits within 1e-4 of transformers; the engine (paged KV cache, continuous
batching, chunked prefill, native kernels on and off) gives transformers' greedy tokens,
prompts longer than the window included (and blocks behind the window dropped where every
layer slides: qwen3_moe_window); each feature these architectures add is shown to
change the output (so the parity tests guard it); config mapping and its errors.
"""

import re

import pytest
import torch

from models import native
from models.config import ModelConfig
from models.engine.sampling import SamplingParams
from models.errors import ModelLoadError
from models.loading import load_model
from tests.models.engine.helpers import make_engine, run_all
from tests.models.hf_reference import (
    NEW_ARCH_VARIANTS,
    assert_breakage_moves_logits,
    make_new_arch_checkpoint,
)

SEQ_LEN = 48  # longer than the window (16) of the windowed variants
PROMPT_LENS = [5, 17, 40, 70]  # 40 and 70: past the window, 70 over several blocks
NUM_NEW = 12

# HF names of the tensors these architectures add, as docpipe's loader must map them. Until
# models/loading.py's WEIGHT_RENAMES has rows for them, these stand in (see `_renames`).
_L = r"model\.layers\.(?P<l>\d+)\."
NEW_WEIGHT_RENAMES = [
    (re.compile(_L + r"self_attn\.(?P<n>q_norm|k_norm)\.weight"), "layers.{l}.self_attn.{n}.weight"),
    (re.compile(_L + r"(?P<n>pre_feedforward_layernorm|post_feedforward_layernorm)\.weight"),
     "layers.{l}.{n}.weight"),
]


@pytest.fixture(scope="module", autouse=True)
def _renames():
    from models import loading

    missing = [row for row, name in zip(NEW_WEIGHT_RENAMES, (
        "model.layers.0.self_attn.q_norm.weight",
        "model.layers.0.pre_feedforward_layernorm.weight",
    ), strict=True) if loading._rename(name) is None]
    loading.WEIGHT_RENAMES.extend(missing)
    yield
    for row in missing:
        loading.WEIGHT_RENAMES.remove(row)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for variant in NEW_ARCH_VARIANTS:
        path = tmp_path_factory.mktemp(variant)
        out[variant] = (path, make_new_arch_checkpoint(variant, path))
    return out


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", list(NEW_ARCH_VARIANTS))
def test_logits_match_transformers(checkpoints, variant):
    path, ref = checkpoints[variant]
    ours = load_model(path, dtype="float32").model
    ids = _ids(2, SEQ_LEN, 1)
    with torch.no_grad():
        want = ref(ids).logits
    torch.testing.assert_close(ours.logits_dense(ids), want, atol=1e-4, rtol=1e-4)


def _hf_greedy(ref, prompt: list[int], num_new: int) -> list[int]:
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=num_new, do_sample=False,
                           attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def greedy_refs(checkpoints):
    prompts = [_ids(1, n, 10 + n)[0].tolist() for n in PROMPT_LENS]
    return prompts, {v: [_hf_greedy(ref, p, NUM_NEW) for p in prompts]
                     for v, (_, ref) in checkpoints.items()}


@pytest.fixture(params=["native", "torch"])
def kernels(request, monkeypatch):
    """The native attention kernels (when they build here) or the torch path only."""
    if request.param == "torch":
        monkeypatch.setattr(native, "paged_decode", lambda: None)
        monkeypatch.setattr(native, "prefill_attention", lambda *a: None)
    elif native.paged_decode() is None:
        pytest.skip("native kernels unavailable")
    return request.param


@pytest.mark.parametrize("engine_kw", [
    dict(),  # blocks of 16, the whole prompt in one step
    dict(block_size=4, max_num_batched_tokens=24),  # chunked prefill, many block runs
], ids=["one-step", "chunked"])
@pytest.mark.parametrize("variant", list(NEW_ARCH_VARIANTS))
def test_engine_greedy_matches_transformers_generate(checkpoints, greedy_refs, variant,
                                                     engine_kw, kernels):
    path, _ = checkpoints[variant]
    prompts, refs = greedy_refs
    model = load_model(path, dtype="float32").model
    engine = make_engine(model, **engine_kw)
    params = SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
    outs = run_all(engine, prompts, params)
    assert [o.token_ids for o in outs] == refs[variant]


# -- the attention scale on every paged path -----------------------------------------------
@pytest.mark.parametrize("head_dim", [32, 64])  # 64: the native prefill kernel's too
@pytest.mark.parametrize("window", [None, 16])
@pytest.mark.parametrize("num_new", [1, 6], ids=["decode", "prefill-after-cached"])
def test_paged_attention_uses_the_scale(kernels, window, num_new, head_dim):
    """A gemma3 layer (scale 24**-0.5, head_dim 32 or 64) reading K/V from two runs of cache slots
    (decode: log-sum-exp merge of the runs or the native kernel; prefill after cached keys:
    the split or masked call, or the native prefill kernel) gives its no-cache output."""
    from models.attention import Attention, AttentionMetadata, SeqSpan
    from models.config import tiny_config
    from models.layers import RotaryEmbedding

    kind = "full_attention" if window is None else "sliding_attention"
    config = tiny_config("gemma3_text", num_hidden_layers=1, layer_types=[kind],
                         head_dim=head_dim)
    assert config.attention_scale != config.head_dim**-0.5
    attn = Attention(config, 0)
    gen = torch.Generator().manual_seed(0)
    for param in attn.parameters():
        param.data.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    ctx = 40
    x = torch.randn(ctx, config.hidden_size, generator=gen)
    cos, sin = RotaryEmbedding(config, local=window is not None).cos_sin(torch.arange(ctx),
                                                                         x.dtype)
    with torch.no_grad():
        want = attn(x, cos, sin, AttentionMetadata.for_dense([ctx]), None)
        Hkv, D = config.num_key_value_heads, config.head_dim
        cache = (torch.zeros(Hkv, 512, D), torch.zeros(Hkv, 512, D))
        half = 20  # positions [0, 20) in slots 100.., [20, 40) in slots 300..
        runs = [slice(100, 100 + half), slice(300, 300 + ctx - half)]
        slots = torch.cat([torch.arange(r.start, r.stop) for r in runs])
        got = torch.empty_like(want)
        for lo, hi in [(0, ctx - num_new), (ctx - num_new, ctx)]:  # cache the prefix, then
            kv_slots = [slice(r.start, min(r.stop, r.start + hi - pos)) for r, pos in
                        zip(runs, (0, half), strict=True) if hi > pos]
            span = SeqSpan(0, hi - lo, hi, 0, kv_slots)
            meta = AttentionMetadata([span], slot_mapping=slots[lo:hi])
            got[lo:hi] = attn(x[lo:hi], cos[lo:hi], sin[lo:hi], meta, cache)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# -- each feature changes the output (the tests above would catch its loss) ----------------
def _no_qk_norm(model):
    for layer in model.layers:
        layer.self_attn.q_norm = layer.self_attn.k_norm = None


def _no_unit_offset(model):
    for module in model.modules():
        if hasattr(module, "unit_offset"):
            module.unit_offset = False


def _head_dim_scale(model):
    for layer in model.layers:
        layer.self_attn.scale = model.config.head_dim**-0.5


def _global_rope_everywhere(model):
    model.layer_is_local = [False] * len(model.layers)


def _no_window(model):
    for layer in model.layers:
        layer.self_attn.window = None


def _no_softcap(model):
    model.config.final_logit_softcapping = None


def _no_sandwich_norms(model):
    for layer in model.layers:
        layer.post_attention_layernorm.forward = lambda x: x
        layer.post_feedforward_layernorm.forward = lambda x: x


@pytest.mark.parametrize(("variant", "breakage"), [
    ("qwen3", _no_qk_norm),
    ("qwen3_moe", _no_qk_norm),
    ("qwen3_window", _no_window),
    ("qwen3_moe_window", _no_window),
    ("gemma3", _no_qk_norm),
    ("gemma3", _no_unit_offset),
    ("gemma3", _head_dim_scale),
    ("gemma3", _global_rope_everywhere),
    ("gemma3", _no_window),
    ("gemma3", _no_sandwich_norms),
    ("gemma3_capped", _no_softcap),
], ids=lambda x: getattr(x, "__name__", x))
def test_each_feature_changes_the_output(checkpoints, variant, breakage):
    path, ref = checkpoints[variant]
    assert_breakage_moves_logits(path, ref, breakage, SEQ_LEN)


# -- config mapping ------------------------------------------------------------------------
def test_gemma3_default_layer_types_follow_transformers():
    from transformers import Gemma3TextConfig

    for num_layers, pattern in [(13, None), (7, 3), (4, 1)]:
        extra = {} if pattern is None else {"sliding_window_pattern": pattern}
        hf = Gemma3TextConfig(num_hidden_layers=num_layers, **extra)
        raw = hf.to_dict()
        raw.pop("layer_types")
        raw.pop("_sliding_window_pattern", None)
        raw.update(extra)
        ours = ModelConfig.from_hf_dict(raw)
        assert ours.layer_types == hf.layer_types
    assert ModelConfig.from_hf_dict(Gemma3TextConfig(num_hidden_layers=8).to_dict()).layer_types[
        :6] == ["sliding_attention"] * 5 + ["full_attention"]


def test_gemma3_config_forms():
    """A hub-style (pre transformers 5) gemma3 config.json with top-level rope fields, and a
    multimodal "gemma3" config whose text_config lists only what differs from the defaults."""
    old = {
        "model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 7, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 32, "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 32,
        "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 512,
        "sliding_window_pattern": 6, "final_logit_softcapping": None, "vocab_size": 256,
    }
    c = ModelConfig.from_hf_dict(old)
    assert (c.hidden_act, c.rope_theta, c.rope_local_base_freq) == (
        "gelu_pytorch_tanh", 1_000_000.0, 10_000.0)
    assert c.rope_scaling == {"factor": 8.0, "rope_type": "linear"}
    assert c.layer_types == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
    assert c.attention_scale == pytest.approx(32**-0.5) and c.tie_word_embeddings and c.is_gemma
    nested = {"model_type": "gemma3", "text_config": {
        "model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240,
        "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024}, "vision_config": {"model_type": "siglip_vision_model"}}
    c = ModelConfig.from_hf_dict(nested)
    assert (c.model_type, c.num_hidden_layers, c.head_dim, c.num_attention_heads) == (
        "gemma3_text", 34, 256, 8)
    assert (c.vocab_size, c.query_pre_attn_scalar, c.rope_local_base_freq) == (
        262_208, 256, 10_000.0)
    assert c.layer_types.count("full_attention") == 5 and c.sliding_window == 1024
    assert c.eos_token_id == 1  # Gemma3TextConfig's default
    nested["text_config"]["eos_token_id"] = None  # an explicit null is kept, as transformers does
    assert ModelConfig.from_hf_dict(nested).eos_token_id is None


def test_qwen3_moe_config_forms():
    from transformers import Qwen3MoeConfig

    hf = Qwen3MoeConfig(num_experts=8, num_experts_per_tok=2, num_hidden_layers=4,
                        mlp_only_layers=[0], decoder_sparse_step=2)
    c = ModelConfig.from_hf_dict(hf.to_dict())
    assert (c.num_local_experts, c.norm_topk_prob, c.shared_expert_intermediate_size) == (8, False, 0)
    assert [c.is_moe_layer(i) for i in range(4)] == [False, True, False, True]
    hub = {"model_type": "qwen3_moe", "num_experts": 8, "num_experts_per_tok": 2,
           "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
           "vocab_size": 256, "mlp_only_layers": None}
    c = ModelConfig.from_hf_dict(hub)
    assert (c.num_local_experts, c.norm_topk_prob, c.head_dim, c.mlp_only_layers) == (
        8, False, 16, [])


@pytest.mark.parametrize(("fields", "message"), [
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0 is not supported"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention=true"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                          "sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
     "rope_parameters.sliding_attention.rope_type 'linear' is not supported"),
    ({"hidden_activation": "relu"}, "hidden_act='relu' is not supported"),
    ({"attention_bias": True}, "attention_bias=True is not supported for gemma3_text"),
    ({"query_pre_attn_scalar": 0}, "query_pre_attn_scalar=0 must be positive"),
])
def test_unsupported_fields_name_the_field(fields, message):
    raw = {"model_type": "gemma3_text", "hidden_size": 64, "num_attention_heads": 4,
           "num_hidden_layers": 2, "vocab_size": 256, **fields}
    with pytest.raises(ModelLoadError, match=re.escape(message)):
        ModelConfig.from_hf_dict(raw, source="x/config.json")


def test_qwen3_attention_bias_is_refused():
    with pytest.raises(ModelLoadError, match="attention_bias=True is not supported for qwen3"):
        ModelConfig.from_hf_dict({"model_type": "qwen3", "attention_bias": True,
                                  "num_hidden_layers": 2})


@pytest.mark.parametrize("model_type", ["qwen3", "qwen3_moe", "gemma3_text"])
def test_llm_generates_as_transformers_on_a_tiny_checkpoint(tmp_path, model_type):
    """models.LLM on a checkpoint with a tokenizer (tests/tiny_checkpoint.py), a text prompt
    longer than gemma3's window: the greedy tokens of transformers' generate."""
    from transformers import AutoModelForCausalLM

    from models import LLM
    from tests.tiny_checkpoint import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path / model_type, model_type)
    llm = LLM(str(path), dtype="float32", block_size=4, max_num_batched_tokens=32)
    prompt = "The whale surfaced twice, then dove below the grey water of the bay."
    ids = llm.get_tokenizer().encode(prompt)
    assert len(ids) > 40
    out = llm.generate(prompt, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    ref = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        want = ref.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                            attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    want = want[0, len(ids):].tolist()  # may stop early, at the checkpoint's EOS
    assert out[0].token_ids[: len(want)] == want and len(want) > 0
