"""DeepSeek-V3's gate as a router option of the MoE block: block-level parity with
transformers' DeepseekV3MoE on copied random weights (fp32), and the gate's rules."""

from __future__ import annotations

import pytest
import torch

from models.config import ModelConfig, tiny_config
from models.layers import param_dtype
from models.moe import SparseMoeBlock, moe_gate, route


def _hf_v3_moe(seed: int, **kw):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    cfg = DeepseekV3Config(hidden_size=64, moe_intermediate_size=32, intermediate_size=96,
                           num_attention_heads=4, num_key_value_heads=4, **kw)
    torch.manual_seed(seed)
    block = DeepseekV3MoE(cfg).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
        block.gate.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts) * 0.1)
    return cfg, block


def _ours_from(cfg, hf, dtype=torch.float32) -> SparseMoeBlock:
    ours_cfg = tiny_config(
        "mixtral", n_routed_experts=cfg.n_routed_experts, num_local_experts=0,
        num_experts_per_tok=cfg.num_experts_per_tok, moe_intermediate_size=32,
        n_shared_experts=cfg.n_shared_experts, scoring_func="sigmoid", topk_method="noaux_tc",
        n_group=cfg.n_group, topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
        routed_scaling_factor=cfg.routed_scaling_factor,
    )
    with param_dtype(dtype):
        ours = SparseMoeBlock(ours_cfg).eval()
    with torch.no_grad():
        ours.gate.weight.copy_(hf.gate.weight)
        ours.w13.copy_(hf.experts.gate_up_proj)
        ours.w2.copy_(hf.experts.down_proj)
        se = hf.shared_experts
        ours.shared_expert.gate_up_proj.weight.copy_(
            torch.cat([se.gate_proj.weight, se.up_proj.weight]))
        ours.shared_expert.down_proj.weight.copy_(se.down_proj.weight)
        ours.set_selection_bias(hf.gate.e_score_correction_bias)
    return ours


@pytest.mark.parametrize("kw", [
    dict(n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1,
         routed_scaling_factor=2.5, norm_topk_prob=True),
    dict(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=3, n_shared_experts=2,
         routed_scaling_factor=1.0, norm_topk_prob=False),
    dict(n_routed_experts=8, num_experts_per_tok=3, n_group=1, topk_group=1, n_shared_experts=1,
         routed_scaling_factor=1.5, norm_topk_prob=True),
])
def test_v3_block_matches_transformers(kw):
    cfg, hf = _hf_v3_moe(0, **kw)
    ours = _ours_from(cfg, hf)
    x = torch.randn(2, 37, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(x)
        got = ours(x.reshape(-1, 64)).reshape(want.shape)
        _, want_w, want_ids = hf.gate(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    w, ids = route(x.reshape(-1, 64) @ hf.gate.weight.T, cfg.num_experts_per_tok,
                   scoring_func="sigmoid", selection_bias=hf.gate.e_score_correction_bias,
                   n_group=cfg.n_group, topk_group=cfg.topk_group, normalize=cfg.norm_topk_prob,
                   routed_scaling_factor=cfg.routed_scaling_factor)
    order_w, order_ids = ids.sort(dim=-1)[1], want_ids.sort(dim=-1)[1]
    assert torch.equal(ids.gather(1, order_w), want_ids.gather(1, order_ids))
    torch.testing.assert_close(w.gather(1, order_w), want_w.gather(1, order_ids))
    # every token chooses K experts
    counts = torch.bincount(ids.reshape(-1), minlength=cfg.n_routed_experts)
    assert int(counts.sum()) == x.shape[0] * x.shape[1] * cfg.num_experts_per_tok


def test_bias_changes_choice_not_weights():
    logits = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    bias = torch.zeros(8)
    bias[3] = 10.0  # expert 3 always chosen ...
    w, ids = route(logits, 2, selection_bias=bias, normalize=False)
    assert bool((ids == 3).any(dim=1).all())
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(w, probs.gather(1, ids))  # ... with its unbiased weight


def test_group_limit_keeps_choice_inside_the_best_groups():
    logits = torch.randn(64, 8, generator=torch.Generator().manual_seed(2)) * 3
    _, ids = route(logits, 2, scoring_func="sigmoid", n_group=4, topk_group=1)
    assert bool(((ids // 2)[:, 0] == (ids // 2)[:, 1]).all())  # one group of 2 experts


def test_softmax_defaults_equal_moe_gate():
    logits = torch.randn(40, 6, generator=torch.Generator().manual_seed(3))
    for normalize in (True, False):
        w, ids = route(logits, 2, normalize=normalize)
        w0, ids0 = moe_gate(logits, 2, normalize)
        assert torch.equal(ids, ids0) and torch.equal(w, w0)


def test_v3_config_fields_validated():
    with pytest.raises(ValueError, match="n_group=3"):
        tiny_config("mixtral", num_local_experts=4, n_group=3)
    with pytest.raises(ValueError, match="scoring_func"):
        tiny_config("mixtral", scoring_func="relu")
    cfg = ModelConfig(model_type="mixtral", n_routed_experts=8, n_shared_experts=2,
                      moe_intermediate_size=16, hidden_size=64, num_attention_heads=4)
    assert cfg.num_local_experts == 8 and cfg.shared_expert_intermediate_size == 32
    assert not cfg.shared_expert_gated


def test_v3_router_logits_are_fp32_in_a_bf16_block():
    """As transformers' DeepseekV3TopkRouter: the logits come from fp32 inputs and weight,
    so a bf16 model picks the experts its fp32 router scores would pick."""
    cfg, hf = _hf_v3_moe(0, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                         n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True)
    ours = _ours_from(cfg, hf, dtype=torch.bfloat16)
    assert ours.w13.dtype == torch.bfloat16 and ours.gate.weight.dtype == torch.float32
    x = torch.randn(33, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with torch.no_grad():
        ours(x, keep_logits=True)
    want = torch.nn.functional.linear(x.float(), hf.gate.weight.float())
    assert ours.last_router_logits.dtype == torch.float32
    assert torch.equal(ours.last_router_logits, want)
