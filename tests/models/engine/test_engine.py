"""Engine correctness on tiny random models: batching, prefix caching, preemption, windows, MoE."""

import pytest
import torch

from models.engine.sampling import SamplingParams
from tests.models.engine.helpers import (
    greedy_reference,
    make_engine,
    random_prompts,
    run_all,
    tiny_model,
)

ARCHS = ["llama", "mistral", "qwen2", "mixtral", "qwen2_moe"]
GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module", params=ARCHS)
def arch_case(request):
    model = tiny_model(request.param)
    prompts = random_prompts(12, seed=3)
    prompts += [prompts[0] + [5, 6, 7] * 10, prompts[0][:17]]  # shared prefixes
    refs = [greedy_reference(model, p, GREEDY.max_tokens) for p in prompts]
    return model, prompts, refs


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_batched_equals_sequential(arch_case, prefix_caching):
    model, prompts, refs = arch_case
    engine = make_engine(model, max_num_batched_tokens=64, enable_prefix_caching=prefix_caching)
    outs = run_all(engine, prompts, GREEDY)
    assert [o.token_ids for o in outs] == refs
    assert all(o.finish_reason == "length" for o in outs)


def test_preemption_keeps_outputs_exact(arch_case):
    model, prompts, refs = arch_case
    # 24 blocks of 4 tokens: too few for all sequences at once, enough for the longest one.
    # Without decode reservation, sequences are admitted on their first chunk and preempted
    # (recomputed later) when the pool runs dry.
    engine = make_engine(model, num_blocks=24, block_size=4, max_num_batched_tokens=32,
                         reserve_decode_blocks=False)
    outs = run_all(engine, prompts, GREEDY)
    assert engine.stats()["num_preemptions"] > 0
    assert [o.token_ids for o in outs] == refs
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_reservation_admits_only_what_can_finish(arch_case):
    """With decode reservation (the default) a sequence is admitted, while others run, only
    when its whole lifetime fits: the same short pool finishes with no preemption. (Models
    whose layers all slide a window release blocks instead of reserving them.)"""
    model, prompts, refs = arch_case
    engine = make_engine(model, num_blocks=24, block_size=4, max_num_batched_tokens=32)
    outs = run_all(engine, prompts, GREEDY)
    if engine.block_manager.reserve_decode:
        assert engine.stats()["num_preemptions"] == 0
    assert [o.token_ids for o in outs] == refs
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_prefix_cache_serves_shared_prefix():
    model = tiny_model("llama")
    prefix = torch.randint(2, 256, (1500,), generator=torch.Generator().manual_seed(5)).tolist()
    engine = make_engine(model, num_blocks=400, max_num_batched_tokens=512)
    first, = run_all(engine, [prefix + [7, 8, 9]], SamplingParams(max_tokens=2, ignore_eos=True))
    assert first.num_cached_tokens == 0
    engine.add_request("second", prefix + [10, 11], SamplingParams(max_tokens=2, ignore_eos=True))
    second = []
    while engine.has_unfinished():
        second += engine.step()
    assert second[0].num_cached_tokens >= 1488
    assert engine.stats()["prefix_cache_hit_rate"] > 0.4


def test_moe_expert_counts_per_request():
    model = tiny_model("mixtral")
    engine = make_engine(model)
    prompts = random_prompts(5, seed=9)
    outs = run_all(engine, prompts, SamplingParams(max_tokens=6, ignore_eos=True))
    cfg = model.config
    for p, o in zip(prompts, outs):
        # every prompt token and every generated token but the last went through the model
        tokens = len(p) + len(o.token_ids) - 1
        assert sum(o.expert_token_counts) == tokens * cfg.num_experts_per_tok * cfg.num_hidden_layers
    totals = engine.stats()["expert_token_counts"]
    assert totals == [sum(col) for col in zip(*(o.expert_token_counts for o in outs))]


def test_sliding_window_bounds_blocks_per_sequence():
    window, block_size, num_new = 256, 16, 20_000
    model = tiny_model("mistral", sliding_window=window, max_position_embeddings=32_768,
                       num_hidden_layers=1, hidden_size=32, intermediate_size=32,
                       num_attention_heads=2, num_key_value_heads=1)
    engine = make_engine(model, num_blocks=64, block_size=block_size)
    engine.add_request("long", [3, 4, 5], SamplingParams(max_tokens=num_new, ignore_eos=True))
    bound = -(-window // block_size) + 2
    max_held = 0
    seq = engine.requests["long"]
    out = []
    while engine.has_unfinished():
        out += engine.step()
        max_held = max(max_held, sum(1 for b in seq.block_table if b >= 0))
    assert out[0].num_generated_tokens == num_new
    assert max_held <= bound, f"held {max_held} blocks, bound {bound}"


def test_sliding_window_eviction_keeps_outputs_exact():
    model = tiny_model("mistral")  # window 16, all layers windowed
    prompts = random_prompts(6, seed=11, max_len=50)
    refs = [greedy_reference(model, p, 30) for p in prompts]
    engine = make_engine(model, num_blocks=40, block_size=4, max_num_batched_tokens=16)
    outs = run_all(engine, prompts, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    assert [o.token_ids for o in outs] == refs


def test_abort_releases_blocks():
    model = tiny_model("llama")
    engine = make_engine(model)
    engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("b", [4, 5, 6], SamplingParams(max_tokens=3, ignore_eos=True))
    engine.step()
    aborted = engine.abort("a")
    assert aborted.finish_reason == "abort"
    while engine.has_unfinished():
        engine.step()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_bad_requests_raise():
    model = tiny_model("llama", max_position_embeddings=64)
    engine = make_engine(model)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.add_request("e", [], SamplingParams())
    with pytest.raises(ValueError, match="context"):
        engine.add_request("long", list(range(2, 70)), SamplingParams())
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request("v", [999], SamplingParams())


def test_batch_invariant_engine(arch_case):
    """Batch-invariant mode: prefill pieces end only at multiples of the alignment or at the
    prompt end, prefix hits come in whole multiples of it, and outputs stay exact."""
    model, prompts, refs = arch_case
    engine = make_engine(model, max_num_batched_tokens=64, max_num_seqs=8,
                         batch_invariant=True, prefill_align_tokens=32)
    assert engine.config.align == 32
    pieces = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        batch = schedule()
        pieces.extend((s.num_computed_tokens, n, s.num_prompt_tokens)
                      for s, n in zip(batch.seqs, batch.num_new_tokens))
        return batch

    engine.scheduler.schedule = recording_schedule
    outs = run_all(engine, prompts, GREEDY)
    assert [o.token_ids for o in outs] == refs
    prefill = [(start, n, plen) for start, n, plen in pieces if start < plen]
    assert any(start + n < plen for start, n, plen in prefill), "no prompt was cut: weak test"
    assert all((start + n) % 32 == 0 or start + n >= plen for start, n, plen in prefill), prefill
    assert all(o.num_cached_tokens % 32 == 0 for o in outs)


def test_batch_invariant_prefix_hits_round_down_to_the_alignment():
    model = tiny_model("llama")
    prefix = torch.randint(2, 256, (1500,), generator=torch.Generator().manual_seed(5)).tolist()
    engine = make_engine(model, num_blocks=400, max_num_batched_tokens=1024, max_num_seqs=4,
                         batch_invariant=True, prefill_align_tokens=512)
    run_all(engine, [prefix + [7, 8, 9]], SamplingParams(max_tokens=2, ignore_eos=True))
    second, = run_all(engine, [prefix + [10, 11]], SamplingParams(max_tokens=2, ignore_eos=True))
    assert second.num_cached_tokens == 1024


def test_batch_invariant_alignment_fits_the_budget():
    from models.engine.engine import EngineConfig
    assert EngineConfig(batch_invariant=True).align == 512
    # decodes may take max_num_seqs - 1 tokens of the budget: the alignment leaves room
    assert EngineConfig(batch_invariant=True, max_num_batched_tokens=256, max_num_seqs=16).align == 240
    assert EngineConfig(batch_invariant=False).align is None
