"""Sampler tests: greedy, filters, penalties against a slow reference, seeded determinism
independent of the batch, distribution sanity, min_tokens, stop strings, validation."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models.engine.sampling import Sampler, SamplingParams, SamplingState, find_stop_string

V = 1000
sampler = Sampler()


def states_for(params_list, prompts=None):
    prompts = prompts or [[] for _ in params_list]
    return [SamplingState(p, list(pr)) for p, pr in zip(params_list, prompts, strict=True)]


def draw_many(probs: list[float], num_draws: int, seeded: bool = True, **kwargs) -> Counter:
    """One batched call with `num_draws` rows of the same distribution."""
    logits = torch.tensor(probs).log().expand(num_draws, -1).contiguous()
    params = [SamplingParams(seed=i if seeded else None, **kwargs) for i in range(num_draws)]
    return Counter(sampler(logits, states_for(params)))


# ---- greedy ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_equals_argmax(dtype):
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(0)).to(dtype)
    before = logits.clone()
    tokens = sampler(logits, states_for([SamplingParams(temperature=0.0)] * 6))
    assert tokens == logits.float().argmax(-1).tolist()
    assert torch.equal(logits, before), "sampler must not modify the caller's logits"


def test_temperature_to_zero():
    assert SamplingParams(temperature=0.0).is_greedy
    assert SamplingParams(temperature=1e-6).is_greedy
    assert not SamplingParams(temperature=1e-3).is_greedy
    logits = torch.randn(8, V, generator=torch.Generator().manual_seed(1))
    top = logits.argmax(-1)
    logits[torch.arange(8), top] += 1.0  # a clear gap: exp(-1 / 1e-3) is 0 in float32
    for t in (1e-6, 1e-3):
        params = [SamplingParams(temperature=t, seed=i) for i in range(8)]
        assert sampler(logits, states_for(params)) == top.tolist()


def test_top_k_1_equals_greedy():
    logits = torch.randn(8, V, generator=torch.Generator().manual_seed(2)) * 0.1
    params = [SamplingParams(temperature=1.5, top_k=1, seed=i) for i in range(8)]
    assert sampler(logits, states_for(params)) == logits.argmax(-1).tolist()


def test_mixed_batch_greedy_rows_match_argmax():
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.0, seed=i) for i in range(6)]
    tokens = sampler(logits, states_for(params))
    assert tokens[1::2] == logits[1::2].argmax(-1).tolist()


# ---- filters on hand-made distributions -----------------------------------------------

PROBS = [0.1, 0.4, 0.05, 0.3, 0.15]  # by rank: 1 (0.4), 3 (0.3), 4 (0.15), 0 (0.1), 2 (0.05)


@pytest.mark.parametrize(("top_p", "nucleus"), [
    (0.35, {1}), (0.65, {1, 3}), (0.75, {1, 3, 4}), (0.9, {1, 3, 4, 0}), (1.0, {0, 1, 2, 3, 4}),
])
def test_top_p_keeps_smallest_set_reaching_p(top_p, nucleus):
    counts = draw_many(PROBS, 2000, top_p=top_p)
    assert set(counts) == nucleus


@pytest.mark.parametrize(("min_p", "kept"), [
    (0.2, {1, 3, 4, 0}), (0.3, {1, 3, 4}), (0.5, {1, 3}), (1.0, {1}),
])
def test_min_p_keeps_tokens_above_fraction_of_max(min_p, kept):
    counts = draw_many(PROBS, 2000, min_p=min_p)
    assert set(counts) == kept


def test_top_k_keeps_k_most_likely():
    assert set(draw_many(PROBS, 2000, top_k=2)) == {1, 3}
    assert set(draw_many(PROBS, 2000, top_k=-1)) == {0, 1, 2, 3, 4}


def test_top_k_then_top_p_renormalises():
    # after top_k=3 the kept mass is 0.85, renormalised 0.47, 0.35, 0.18: p=0.8 is reached by
    # two tokens (0.82); without renormalising it would take three (0.4 + 0.3 = 0.7 < 0.8)
    assert set(draw_many(PROBS, 2000, top_k=3, top_p=0.8)) == {1, 3}
    assert set(draw_many(PROBS, 2000, top_k=3, top_p=0.85)) == {1, 3, 4}


@pytest.mark.parametrize("seeded", [True, False])
def test_distribution_matches_probabilities(seeded):
    probs = [0.1, 0.2, 0.3, 0.4]
    torch.manual_seed(0)
    n = 20_000
    counts = draw_many(probs, n, seeded=seeded)
    for token, p in enumerate(probs):
        assert abs(counts[token] / n - p) < 0.02, (token, counts[token] / n, p)


def test_single_seeded_stream_matches_probabilities():
    probs = [0.1, 0.2, 0.3, 0.4]
    logits = torch.tensor(probs).log().unsqueeze(0)
    state = SamplingState(SamplingParams(seed=5), [])
    counts = Counter(sampler(logits, [state])[0] for _ in range(3000))
    for token, p in enumerate(probs):
        assert abs(counts[token] / 3000 - p) < 0.03


# ---- penalties against a slow reference -----------------------------------------------

def reference_penalties(row: list[float], prompt: list[int], output: list[int],
                        p: SamplingParams) -> list[float]:
    row = list(row)
    for t in (set(prompt) if p.penalize_prompt else set()) | set(output):
        r = p.repetition_penalty
        row[t] = row[t] / r if row[t] > 0 else row[t] * r
    for t, c in Counter(output).items():
        row[t] -= p.frequency_penalty * c
        row[t] -= p.presence_penalty
    return row


def test_penalties_match_reference():
    g = torch.Generator().manual_seed(4)
    rng = torch.Generator().manual_seed(5)
    b = 9
    logits = torch.randn(b, V, generator=g) * 3  # about half negative
    params = [
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(repetition_penalty=0.7, presence_penalty=0.5),
        SamplingParams(frequency_penalty=1.5),
        SamplingParams(presence_penalty=-1.0, frequency_penalty=-0.4),
        SamplingParams(temperature=0.0, repetition_penalty=1.8, presence_penalty=2.0,
                       frequency_penalty=0.3),
        SamplingParams(),  # no penalties: untouched
        SamplingParams(repetition_penalty=1.1, seed=3),
        SamplingParams(repetition_penalty=1.5, penalize_prompt=False),  # output tokens only
        SamplingParams(repetition_penalty=0.6, penalize_prompt=False, frequency_penalty=0.2),
    ]

    def ids(n):  # small id range so tokens repeat
        return torch.randint(0, 60, (n,), generator=rng).tolist()

    prompts = [ids(int(torch.randint(0, 40, (1,), generator=rng))) for _ in range(b)]
    outputs: list[list[int]] = [[] for _ in range(b)]
    states = states_for(params, prompts)
    for phase_len in (25, 1, 0, 3, 1):  # flush many, one, none, several buffered tokens
        for s, out in zip(states, outputs, strict=True):
            new = ids(phase_len)
            out.extend(new)
            for t in new:
                s.append(t)
        got = sampler.apply_penalties(logits, states)
        want = torch.tensor([reference_penalties(logits[i].tolist(), prompts[i], outputs[i],
                                                 params[i]) for i in range(b)])
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert torch.equal(got[5], logits[5])
    # the greedy row with penalties samples the argmax of the penalised logits
    assert sampler(logits[4:5], [states[4]])[0] == int(got[4].argmax())


def test_penalty_counts_are_incremental():
    state = SamplingState(SamplingParams(frequency_penalty=1.0), [1, 2])
    logits = torch.zeros(1, 10)
    for t in (3, 3, 4):
        state.append(t)
    sampler.apply_penalties(logits, [state])
    assert state.output_counts.tolist() == [0, 0, 0, 2, 1, 0, 0, 0, 0, 0]
    assert state.prompt_mask.nonzero().flatten().tolist() == [1, 2]
    state.append(3)
    out = sampler.apply_penalties(logits, [state])
    assert state.output_counts[3] == 3
    assert out[0, 3] == -3.0 and out[0, 4] == -1.0


# ---- seeded determinism ---------------------------------------------------------------

def run_steps(target: SamplingParams, row: int, others: list[SamplingParams], steps=20):
    g = torch.Generator().manual_seed(6)
    states = states_for(others[:row] + [target] + others[row:], [[5, 6, 7]] * (len(others) + 1))
    tokens = []
    for _ in range(steps):
        logits = torch.randn(len(states), V, generator=g)
        target_logits = torch.randn(V, generator=torch.Generator().manual_seed(len(tokens)))
        logits[row] = target_logits
        out = sampler(logits, states)
        for s, t in zip(states, out, strict=True):
            s.append(t)
        tokens.append(out[row])
    return tokens


TARGET = SamplingParams(seed=1234, temperature=0.9, top_k=200, top_p=0.95,
                        repetition_penalty=1.1, min_tokens=3, stop_token_ids=[0])
OTHERS = [
    SamplingParams(seed=7),
    SamplingParams(),  # unseeded: global RNG
    SamplingParams(temperature=0.0, presence_penalty=1.0),
    SamplingParams(top_k=5, min_p=0.1),
]


def test_seed_determinism_independent_of_batch():
    torch.manual_seed(0)
    alone = run_steps(TARGET, 0, [])
    torch.manual_seed(1)
    assert run_steps(TARGET, 3, OTHERS) == alone
    assert run_steps(TARGET, 0, OTHERS[::-1]) == alone


def test_different_seeds_differ():
    # randn logits over 1000 tokens: 20 matching draws by chance would be a miracle
    p = dict(temperature=1.0)
    a = run_steps(SamplingParams(seed=1, **p), 0, [])
    b = run_steps(SamplingParams(seed=2, **p), 0, [])
    assert a != b
    assert a == run_steps(SamplingParams(seed=1, **p), 0, [])


# ---- min_tokens -----------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_tokens_masks_eos_and_stop_tokens(temperature):
    logits = torch.zeros(1, 10)
    logits[0, 3] = 50.0  # EOS
    logits[0, 7] = 40.0  # stop token (sampled after EOS with probability e^-10)
    state = SamplingState(SamplingParams(temperature=temperature, min_tokens=3,
                                         stop_token_ids=[7], seed=0), [])
    out = []
    for _ in range(4):
        out.append(sampler(logits, [state], frozenset({3}))[0])
        state.append(out[-1])
    assert all(t not in (3, 7) for t in out[:3])
    assert out[3] == 3


def test_ignore_eos_masks_nothing_for_eos():
    logits = torch.zeros(1, 10)
    logits[0, 3] = 50.0
    params = SamplingParams(temperature=0.0, min_tokens=3, ignore_eos=True)
    assert sampler(logits, [SamplingState(params, [])], frozenset({3})) == [3]


# ---- stop strings ---------------------------------------------------------------------

def test_find_stop_string():
    # spans old and new text
    assert find_stop_string("hello wor", ["lo w"], 6) == (3, "lo w")
    assert find_stop_string("hello wor", ["lo w"], 7) is None
    # earliest wins, not the first listed
    assert find_stop_string("abcXYZdef", ["def", "XY"], 4) == (3, "XY")
    # equal start: the first listed wins
    assert find_stop_string("abcdef", ["cde", "cd"], 4) == (2, "cde")
    # wholly in old text: ignored (found in an earlier step)
    assert find_stop_string("STOP and more", ["STOP"], 5) is None
    assert find_stop_string("STOP and more STOP", ["STOP"], 15) == (14, "STOP")
    # a short string wholly in old text is ignored even when a longer one reaches further
    assert find_stop_string("ab..xyz", ["ab", "..xyz!"], 5) is None
    assert find_stop_string("", ["x"], 0) is None
    assert find_stop_string("abc", [], 0) is None
    assert find_stop_string("abc", ["c"], 10) is None  # start past the end is clamped


# ---- validation -----------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "field_name"), [
    (dict(n=2), "n=2"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=-0.1), "min_p"),
    (dict(min_p=1.1), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-2.5), "frequency_penalty"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=20, max_tokens=10), "min_tokens=20"),
    (dict(stop=[""]), "stop"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(logprobs=5), "logprobs"),
])
def test_validation_names_field(kwargs, field_name):
    with pytest.raises(ValueError, match=field_name):
        SamplingParams(**kwargs)


def test_params_defaults_and_coercion():
    p = SamplingParams(stop="###", max_tokens=None, min_tokens=100)
    assert p.stop == ["###"] and p.max_tokens is None
    assert SamplingParams(stop=None).stop == []
    assert SamplingParams(logprobs=0).logprobs == 0


# ---- property: never a masked token --------------------------------------------------

@st.composite
def sampling_cases(draw):
    vocab = draw(st.integers(2, 24))
    batch = draw(st.integers(1, 4))
    logits = draw(st.lists(st.floats(-30, 30, width=32), min_size=batch * vocab,
                           max_size=batch * vocab))
    eos = vocab - 1  # token 0 is never EOS or a stop token, so some token stays unmasked
    rows = []
    for _ in range(batch):
        params = SamplingParams(
            temperature=draw(st.sampled_from([0.0, 1e-5, 1e-3]) | st.floats(0.05, 3.0)),
            top_k=draw(st.integers(-1, vocab + 2)),
            top_p=draw(st.sampled_from([1.0]) | st.floats(0.01, 1.0)),
            min_p=draw(st.sampled_from([0.0]) | st.floats(0.0, 1.0)),
            repetition_penalty=draw(st.sampled_from([1.0]) | st.floats(0.5, 2.0)),
            presence_penalty=draw(st.floats(-2.0, 2.0)),
            frequency_penalty=draw(st.floats(-2.0, 2.0)),
            min_tokens=draw(st.integers(0, 3)),
            max_tokens=None,
            stop_token_ids=draw(st.lists(st.integers(1, vocab - 1), max_size=3)),
            ignore_eos=draw(st.booleans()),
            seed=draw(st.none() | st.integers(0, 2**31)),
        )
        prompt = draw(st.lists(st.integers(0, vocab - 1), max_size=8))
        output = draw(st.lists(st.integers(0, vocab - 1), max_size=6))
        rows.append((params, prompt, output))
    return torch.tensor(logits).view(batch, vocab), rows, eos


@settings(max_examples=150, deadline=None)
@given(sampling_cases())
def test_sampled_token_is_never_masked(case):
    logits, rows, eos = case
    states = []
    for params, prompt, output in rows:
        s = SamplingState(params, prompt)
        for t in output:
            s.append(t)
        states.append(s)
    tokens = sampler(logits, states, frozenset({eos}))
    x = sampler.apply_penalties(logits, states, frozenset({eos}))
    for i, ((params, _, output), token) in enumerate(zip(rows, tokens, strict=True)):
        if len(output) < params.min_tokens:
            masked = set(params.stop_token_ids) | (set() if params.ignore_eos else {eos})
            assert token not in masked
        assert math.isfinite(x[i, token])
        if params.is_greedy:
            assert token == int(x[i].argmax())
            continue
        probs = sampler.compute_probs(x[i:i + 1], [params])[0]
        assert probs[token] > 0
        torch.testing.assert_close(probs.sum(), torch.tensor(1.0))
        kept = (probs > 0).nonzero().flatten()
        scaled = x[i] / params.temperature  # compare after scaling: it can create ties
        assert scaled[kept].max() == scaled.max()  # the most likely token always survives
        if 0 < params.top_k < x.shape[1]:
            kth = scaled.sort(descending=True).values[params.top_k - 1]
            assert bool((scaled[kept] >= kth).all())
