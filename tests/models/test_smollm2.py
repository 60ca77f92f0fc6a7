"""The real embedded SmolLM2-135M-Instruct: docpipe against transformers, batched against
one-at-a-time, bf16 against fp32.

Everything here loads the embedded GGUF, so every test is `slow`. The model is loaded once per
module (docpipe ~1-3 s, transformers' GGUF path ~12 s) and shared between `LLM` instances.
"""

from __future__ import annotations

import pytest
import torch

from models import LLM, SamplingParams, load_model
from models.registry import SMOLLM2_NAME

pytestmark = pytest.mark.slow

# Small enough not to allocate the 2 GiB CPU default per LLM, large enough that the batched
# run below never preempts (16 prompts of <= ~360 tokens + 24 generated, ~46 KB per token).
KV_BYTES = 384 << 20

# Six questions whose chat prompts are all 37 tokens: transformers runs them as one batch of
# 6 with no padding (so no attention mask or position shift enters the reference), 6x cheaper
# than one at a time.
CHAT_QUESTIONS = [
    "What is the capital of France?",
    "Explain why the sky is blue.",
    "How do I boil an egg?",
    "How does a bicycle stay upright?",
    "Tell me a joke about computers.",
    "Describe the taste of a lemon.",
]

# ~300 tokens shared by half the batched prompts, so later ones hit the prefix cache.
SHARED_DOCUMENT = (
    "You are a careful assistant. Answer questions using only the report below.\n\n"
    "Report: The Riverside Community Garden opened in the spring of 2019 on a vacant lot "
    "that had been used as a parking area for more than twenty years. Volunteers removed the "
    "asphalt by hand over three weekends, brought in forty cubic meters of compost donated by "
    "the city, and built twenty-four raised beds from reclaimed timber. In the first season, "
    "the garden produced roughly nine hundred kilograms of vegetables, most of which were given "
    "to the food bank on Elm Street. The most successful crops were tomatoes, zucchini, kale "
    "and green beans; carrots struggled because the soil was still compacted. In 2020 the "
    "garden added a rainwater collection system made of six connected barrels holding about "
    "fifteen hundred liters in total, which cut the use of city water by almost half during "
    "the summer. A beekeeper from the neighborhood installed two hives along the northern "
    "fence, and pollination of the squash improved noticeably. Membership grew from eighteen "
    "households to fifty-three by the end of 2021, and a waiting list was started. The "
    "garden committee meets on the first Tuesday of every month, keeps its accounts in a "
    "shared spreadsheet, and charges each household an annual fee of twenty dollars, which "
    "pays for seeds, tools and insurance. Children from the nearby primary school visit every "
    "Thursday afternoon in the growing season to learn about composting and seed saving. "
    "The committee's current plans include a small greenhouse, a wheelchair-accessible path "
    "and a tool library."
)
SHARED_QUESTIONS = [
    "When did the garden open?",
    "How many raised beds were built?",
    "Which crop struggled and why?",
    "How much water can the barrels hold?",
    "How much is the annual fee and what does it pay for?",
    "What are the committee's current plans?",
    "Who visits on Thursdays?",
    "Summarize the report in one sentence.",
]
OTHER_TEXTS = [
    "Hi!",
    "Translate 'good morning, how are you?' into Spanish.",
    "List the planets of the solar system in order from the sun.",
    "Write a short, friendly email to a colleague asking to move tomorrow's meeting to "
    "Friday afternoon because a delivery is arriving in the morning and you need to be home "
    "to sign for it. Keep it under eighty words and end with a thank-you.",
    "What is 17 times 23?",
    "Describe a cat to someone who has never seen one, in a few sentences.",
    "Explain what a hash table is, how collisions are handled with chaining and with open "
    "addressing, and when you would prefer one over the other. Mention load factor too.",
    "Name a famous painting by Vincent van Gogh.",
]


@pytest.fixture(scope="module")
def fp32_model():
    return load_model(SMOLLM2_NAME, dtype="float32")


@pytest.fixture(scope="module")
def tokenizer(fp32_model):
    return fp32_model.tokenizer


def chat_ids(tokenizer, user: str, system: str | None = None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}
    ]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


# -- 1. greedy continuation against transformers ---------------------------------------------
@pytest.fixture(scope="module")
def hf_model(smollm2_gguf):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    return model.eval()


NUM_PARITY_TOKENS = 64
TIE_GAP = 1e-3  # reference top-2 logit gap below which a divergence counts as a near-tie


def test_greedy_continuation_matches_transformers(fp32_model, tokenizer, hf_model):
    """64 greedy tokens from docpipe (fp32) equal transformers' on the same GGUF and prompts.

    Both sides mask the same EOS ids for all 64 steps (transformers: `min_new_tokens=64` with
    `eos_token_id` set to docpipe's stop ids; docpipe: `min_tokens=64`), so neither stops early
    and both pick the best non-EOS token. (docpipe's `ignore_eos=True` does *not* mask EOS, as
    in vLLM, so it would pick EOS where transformers picks the runner-up.)

    Tie tolerance: the two stacks compute the same fp32 function in a different order (fused
    QKV, paged attention vs SDPA), so logits differ in the last bits. A divergence is allowed
    only where transformers' own top-2 logit gap at that step is below TIE_GAP; the comparison
    stops there (after it the prefixes differ) and the position and gap are printed. Any other
    divergence fails. Separately, docpipe's logits along transformers' path must be close to
    transformers' raw logits at every step, which bounds how far the two can drift.
    """
    prompts = [chat_ids(tokenizer, q) for q in CHAT_QUESTIONS]
    assert {len(p) for p in prompts} == {37}  # one unpadded batch for transformers
    llm = LLM(fp32_model, dtype="float32", kv_cache_memory_bytes=KV_BYTES)
    eos_ids = sorted(llm.engine.eos_token_ids)
    ours = llm.generate(
        prompts,
        SamplingParams(max_tokens=NUM_PARITY_TOKENS, min_tokens=NUM_PARITY_TOKENS, temperature=0.0),
    )
    assert all(o.num_generated_tokens == NUM_PARITY_TOKENS for o in ours)
    prompt_ids = torch.tensor(prompts)
    with torch.no_grad():
        ref = hf_model.generate(
            prompt_ids, attention_mask=torch.ones_like(prompt_ids),
            do_sample=False, max_new_tokens=NUM_PARITY_TOKENS, min_new_tokens=NUM_PARITY_TOKENS,
            eos_token_id=eos_ids, pad_token_id=eos_ids[0],
            output_scores=True, output_logits=True, return_dict_in_generate=True,
        )
    want_all = ref.sequences[:, prompt_ids.shape[1]:]
    assert want_all.shape == (len(prompts), NUM_PARITY_TOKENS)
    # docpipe's logits along transformers' paths vs transformers' raw logits: [B, 64, V].
    our_logits = fp32_model.model.logits_dense(ref.sequences[:, :-1])[:, prompt_ids.shape[1] - 1:]
    ref_logits = torch.stack(ref.logits, dim=1).float()
    print(f"max |logit diff| along transformers' paths: {(our_logits - ref_logits).abs().max():.2e}")
    torch.testing.assert_close(our_logits, ref_logits, atol=1e-3, rtol=1e-4)
    for b, (question, out) in enumerate(zip(CHAT_QUESTIONS, ours, strict=True)):
        got, want = out.token_ids, want_all[b].tolist()
        if got == want:
            continue
        pos = next(i for i, (x, y) in enumerate(zip(got, want)) if x != y)
        top2 = ref.scores[pos][b].float().topk(2).values
        gap = (top2[0] - top2[1]).item()
        print(
            f"{question!r}: greedy paths diverge at token {pos}: docpipe {got[pos]} vs "
            f"transformers {want[pos]}, reference top-2 logit gap {gap:.2e}"
        )
        assert gap < TIE_GAP, f"{question!r}: divergence at token {pos} is not a near-tie ({gap:.3g})"


# -- 2. batched equals one request at a time ---------------------------------------------------
NUM_BATCH_TOKENS = 24
GREEDY = SamplingParams(max_tokens=NUM_BATCH_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def batch_prompts(tokenizer):
    """16 chat prompts of 25-~360 tokens; the 8 `shared` ones start with the same ~300 tokens,
    interleaved with the others so admission order mixes them."""
    shared = [chat_ids(tokenizer, q, system=SHARED_DOCUMENT) for q in SHARED_QUESTIONS]
    other = [chat_ids(tokenizer, t) for t in OTHER_TEXTS]
    prompts, is_shared = [], []
    for s, o in zip(shared, other, strict=True):
        prompts += [o, s]
        is_shared += [False, True]
    return prompts, is_shared


@pytest.fixture(scope="module")
def alone_outputs(fp32_model, batch_prompts):
    """Each prompt generated by itself: no batching, no chunking, no prefix cache."""
    prompts, _ = batch_prompts
    llm = LLM(fp32_model, dtype="float32", enable_prefix_caching=False, max_num_seqs=1,
              kv_cache_memory_bytes=KV_BYTES)
    return [llm.generate([p], GREEDY)[0].token_ids for p in prompts]


def test_batch_prompts_are_as_intended(tokenizer, batch_prompts):
    prompts, is_shared = batch_prompts
    shared = [p for p, s in zip(prompts, is_shared) if s]
    common = 0
    while all(p[common] == shared[0][common] for p in shared):
        common += 1
    assert 280 <= common <= 340, common
    lengths = sorted(len(p) for p in prompts)
    assert len(set(lengths)) >= 12 and lengths[0] < 40 and lengths[-1] > 300, lengths


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-cache", "no-cache"])
def test_batched_equals_sequential(fp32_model, batch_prompts, alone_outputs, prefix_caching):
    """One `generate` over 16 prompts gives exactly the token ids of generating each alone.

    `max_num_batched_tokens=256` makes the long prompts prefill in chunks, in the same steps
    as other prompts' decodes. With the prefix cache on, every shared-prefix prompt after the
    first finds cached blocks (the first one's prefill has filled them by the time it is
    admitted: the token budget admits at most one long prompt per step).
    """
    prompts, is_shared = batch_prompts
    llm = LLM(fp32_model, dtype="float32", max_num_seqs=16, max_num_batched_tokens=256,
              enable_prefix_caching=prefix_caching, kv_cache_memory_bytes=KV_BYTES)
    outs = llm.generate(prompts, GREEDY)
    assert llm.engine.scheduler.num_preemptions == 0
    # Chunked prefill really mixed with decodes: prompt 0 was decoding before the last prompt
    # was even admitted.
    assert outs[0].metrics.first_token_time < outs[-1].metrics.first_scheduled_time
    mismatches = [
        (i, len(p), next(k for k, (a, b) in enumerate(zip(o.token_ids, want)) if a != b))
        for i, (p, o, want) in enumerate(zip(prompts, outs, alone_outputs))
        if o.token_ids != want
    ]
    assert not mismatches, f"(prompt index, prompt length, first differing token): {mismatches}"
    assert all(len(o.token_ids) == NUM_BATCH_TOKENS for o in outs)
    cached = [o.num_cached_tokens for o in outs]
    shared_cached = [c for c, s in zip(cached, is_shared) if s]
    print(f"prompt lengths {[len(p) for p in prompts]}, cached tokens {cached}")
    if prefix_caching:
        assert all(c > 0 for c in shared_cached[1:]), cached
        assert all(c % 16 == 0 for c in cached), cached  # whole blocks of block_size 16
        assert max(shared_cached) >= 256, cached
    else:
        assert cached == [0] * len(prompts)


# -- 3. bf16 sanity ----------------------------------------------------------------------------
NUM_BF16_TOKENS = 8
MAX_BF16_LOGIT_GAP = 0.5


def test_bf16_greedy_is_fp32_greedy_or_a_near_tie(fp32_model, tokenizer):
    """bf16 greedy picks what fp32 picks, or a token whose fp32 logit is within 0.5 of the max.

    For each prompt the fp32 model scores bf16's own 8-token path (one dense forward), and at
    every step bf16's choice must be within MAX_BF16_LOGIT_GAP of fp32's best logit there.
    If the first 8 tokens are identical this holds trivially; a difference is printed.
    """
    bf16 = load_model(SMOLLM2_NAME, dtype="bfloat16")
    assert bf16.model.dtype == torch.bfloat16
    prompts = [chat_ids(tokenizer, q) for q in CHAT_QUESTIONS[:2]]
    params = SamplingParams(max_tokens=NUM_BF16_TOKENS, temperature=0.0, ignore_eos=True)
    got = [o.token_ids for o in LLM(bf16, kv_cache_memory_bytes=KV_BYTES).generate(prompts, params)]
    want = [
        o.token_ids
        for o in LLM(fp32_model, dtype="float32", kv_cache_memory_bytes=KV_BYTES).generate(
            prompts, params
        )
    ]
    for prompt, g, w in zip(prompts, got, want, strict=True):
        logits = fp32_model.model.logits_dense(torch.tensor([prompt + g[:-1]]))[0, len(prompt) - 1:]
        chosen = logits.gather(1, torch.tensor(g)[:, None])[:, 0]
        gaps = (logits.max(1).values - chosen).tolist()
        if g != w:
            print(f"bf16 {g} vs fp32 {w}; fp32 gaps of bf16's choices {gaps}")
        assert max(gaps) <= MAX_BF16_LOGIT_GAP, gaps


# -- 4. batch invariance in bf16 ---------------------------------------------------------------
def test_bf16_batch_invariant_outputs_do_not_depend_on_the_batch(batch_prompts):
    """bf16 CPU kernels round a row differently depending on its call's shape (how many rows,
    how many keys), so plain batching can flip a near-tie greedy token. With batch_invariant
    the 16 prompts give the same ids batched (chunked prefill mixed with decodes, prefix hits)
    as one at a time. This is what makes a resumed job equal an uninterrupted one."""
    prompts, _ = batch_prompts
    bf16 = load_model(SMOLLM2_NAME, dtype="bfloat16")
    options = dict(max_num_seqs=16, max_num_batched_tokens=512, batch_invariant=True,
                   prefill_align_tokens=128, kv_cache_memory_bytes=KV_BYTES)
    llm = LLM(bf16, **options)
    alone = [llm.generate([p], GREEDY)[0] for p in prompts]
    batched = LLM(bf16, **options).generate(prompts, GREEDY)
    assert any(o.num_cached_tokens > 0 for o in alone + batched), "no prefix hit: weak test"
    mismatches = [i for i, (a, b) in enumerate(zip(alone, batched)) if a.token_ids != b.token_ids]
    assert not mismatches, f"prompts whose batched ids differ from alone: {mismatches}"


# -- 5. batch invariance in fp32, bit for bit --------------------------------------------------
def _record_logits(llm) -> dict[str, list[torch.Tensor]]:
    """Every logits row the engine samples from, per request id, in step order."""
    seen: dict[str, list[torch.Tensor]] = {}
    execute = llm.engine.runner.execute

    def recording(batch):
        logits, sample_idx, counts = execute(batch)
        for row, i in enumerate(sample_idx):
            seen.setdefault(batch.seqs[i].request_id, []).append(logits[row].clone())
        return logits, sample_idx, counts

    llm.engine.runner.execute = recording
    return seen


@pytest.mark.parametrize("isa", ["native", "avx2"])
def test_fp32_batch_invariant_logits_equal_alone_bit_for_bit(batch_prompts, monkeypatch, isa):
    """fp32 is the default on CPUs without native bf16, and the pipeline runs batch-invariant:
    16 real prompts batched (chunked prefill mixed with decodes, prefix hits) give the same
    logits, bit for bit, at every generated position as each prompt alone. `avx2` also builds
    and runs the x86-64-v3 kernels (DOCPIPE_CPU_ISA=avx2) on this CPU."""
    from models import cpu, native

    if isa == "avx2":
        if not cpu.cpu_info().is_x86 or cpu.cpu_info().detected_level == "baseline":
            pytest.skip("needs an x86-64 CPU with AVX2")
        monkeypatch.setenv("DOCPIPE_CPU_ISA", "avx2")
    cpu.cpu_info.cache_clear()
    native.clear_cache()
    try:
        prompts, _ = batch_prompts
        fp32 = load_model(SMOLLM2_NAME, dtype="auto" if isa == "avx2" else "float32")
        assert fp32.model.dtype == torch.float32
        options = dict(max_num_seqs=16, max_num_batched_tokens=512, batch_invariant=True,
                       prefill_align_tokens=128, kv_cache_memory_bytes=KV_BYTES)
        alone_llm = LLM(fp32, **options)
        alone_logits = _record_logits(alone_llm)
        alone = [alone_llm.generate([p], GREEDY)[0] for p in prompts]
        batched_llm = LLM(fp32, **options)
        batched_logits = _record_logits(batched_llm)
        batched = batched_llm.generate(prompts, GREEDY)
        assert any(o.num_cached_tokens > 0 for o in alone + batched), "no prefix hit: weak test"
        assert batched[0].metrics.first_token_time < batched[-1].metrics.first_scheduled_time
        differ = [i for i, (a, b) in enumerate(zip(alone, batched))
                  if not all(torch.equal(x, y) for x, y in zip(alone_logits[a.request_id],
                                                              batched_logits[b.request_id]))]
        assert not differ, f"prompts whose batched logits differ from alone: {differ}"
        assert all(len(alone_logits[o.request_id]) == NUM_BATCH_TOKENS for o in alone)
        assert [o.token_ids for o in alone] == [o.token_ids for o in batched]
    finally:
        monkeypatch.delenv("DOCPIPE_CPU_ISA", raising=False)
        cpu.cpu_info.cache_clear()
        native.clear_cache()


# -- 6. RoPE in fp32 whatever the model dtype --------------------------------------------------
LONG_POSITIONS = (1536, 4096)


@pytest.fixture(scope="module")
def long_ids(tokenizer):
    from pathlib import Path

    sotu = Path(__file__).parents[2] / "examples" / "sotu"
    text = "\n\n".join(p.read_text() for p in sorted(sotu.glob("*.txt")))
    ids = tokenizer.encode(text)[: LONG_POSITIONS[1]]
    assert len(ids) == LONG_POSITIONS[1]
    return ids


def test_bf16_long_positions_match_transformers_fp32(hf_model, long_ids):
    """At positions 1.5K-4K, docpipe in bf16 rotates q and k by exactly the angles the fp32
    reference computes (its cos/sin rounded to bf16, as transformers does for bf16
    activations), and its next-token choices agree with transformers fp32. With inv_freq
    rounded to bf16 (what `model.to(bf16)` did to a buffer) the angles are up to 3.5 rad off
    and the first check fails (checked here too)."""
    bf16 = load_model(SMOLLM2_NAME, dtype="bfloat16")
    lo, hi = LONG_POSITIONS
    positions = torch.arange(lo, hi)
    x = torch.zeros(1, hi - lo, 1, dtype=torch.bfloat16)
    want_cos, want_sin = hf_model.model.rotary_emb(x, positions[None])
    cos, sin = bf16.model.rotary.cos_sin(positions, torch.bfloat16)
    assert torch.equal(cos[:, 0], want_cos[0]) and torch.equal(sin[:, 0], want_sin[0])

    with torch.inference_mode():
        ref = hf_model(torch.tensor([long_ids])).logits[0, lo:].float()
        ours = bf16.model.logits_dense(torch.tensor([long_ids]))[0, lo:].float()
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"bf16 top-1 agreement with transformers fp32 at {lo}-{hi}: {agree:.4f}")
    assert agree >= 0.95, agree  # measured 0.970 (0.965 with the rounded inv_freq)

    rotary = bf16.model.rotary
    rotary.inv_freq = rotary.inv_freq.to(torch.bfloat16).float()
    rotary._cos_sin = None
    bad_cos, _ = rotary.cos_sin(positions, torch.bfloat16)
    assert not torch.equal(bad_cos[:, 0], want_cos[0]), "the check cannot see the rounding"
