"""docpipe's models against transformers' own implementations, fp32, tiny random checkpoints."""

import pytest
import torch

from models.loading import load_model
from models.moe import squared_deviation_loss, switch_load_balancing_loss
from tests.models.hf_reference import VARIANTS, make_hf_checkpoint

SEQ_LEN = 40  # longer than the window (16) of the sliding-window variants


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for variant in VARIANTS:
        path = tmp_path_factory.mktemp(variant)
        out[variant] = (path, make_hf_checkpoint(variant, path))
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(checkpoints, variant):
    path, ref = checkpoints[variant]
    ours = load_model(path, dtype="float32").model
    ids = torch.randint(0, 256, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
    got = ours.logits_dense(ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["mistral_window", "qwen2_window"])
def test_window_changes_the_output(checkpoints, variant):
    """Guard against a vacuous window test: without the window the logits must differ."""
    path, _ = checkpoints[variant]
    windowed = load_model(path, dtype="float32").model
    full = load_model(path, dtype="float32").model
    for layer in full.layers:
        layer.self_attn.window = None
    ids = torch.randint(0, 256, (1, SEQ_LEN), generator=torch.Generator().manual_seed(2))
    a, b = windowed.logits_dense(ids), full.logits_dense(ids)
    torch.testing.assert_close(a[:, :16], b[:, :16], atol=1e-5, rtol=1e-5)  # inside the window
    assert (a[:, 20:] - b[:, 20:]).abs().max() > 1e-3


@pytest.mark.parametrize("variant", ["mixtral", "qwen2_moe"])
def test_expert_counts_and_aux_loss(checkpoints, variant):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    path, ref = checkpoints[variant]
    ours = load_model(path, dtype="float32").model
    ids = torch.randint(0, 256, (2, SEQ_LEN), generator=torch.Generator().manual_seed(3))
    before = ours.expert_counts().clone()
    with torch.no_grad():
        B, T = ids.shape
        from models.attention import AttentionMetadata

        ours(ids.reshape(-1), torch.arange(T).repeat(B), AttentionMetadata.for_dense([T] * B),
             keep_router_logits=True)
        want_logits = ref(ids, output_router_logits=True).router_logits
    cfg = ours.config
    num_moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    counts = ours.expert_counts() - before
    assert int(counts.sum()) == B * T * cfg.num_experts_per_tok * num_moe_layers
    got_logits = ours.router_logits()
    assert len(got_logits) == num_moe_layers
    want_logits = [w for w in want_logits if w is not None][:num_moe_layers]
    for g, w in zip(got_logits, want_logits, strict=True):
        torch.testing.assert_close(g, w.reshape(g.shape), atol=1e-5, rtol=1e-5)
    want = load_balancing_loss_func(tuple(want_logits), cfg.num_local_experts, cfg.num_experts_per_tok)
    got = switch_load_balancing_loss(got_logits, cfg.num_local_experts, cfg.num_experts_per_tok)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_switch_loss_equals_transformers_on_random_logits():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    gen = torch.Generator().manual_seed(0)
    logits = tuple(torch.randn(50, 8, generator=gen) * 3 for _ in range(3))
    for k in (1, 2, 3):
        want = load_balancing_loss_func(logits, 8, k)
        torch.testing.assert_close(switch_load_balancing_loss(logits, 8, k), want)


def test_squared_deviation_loss_hand_computed():
    # Two tokens, two experts. softmax([0, ln 3]) = [1/4, 3/4]; softmax([0, 0]) = [1/2, 1/2].
    logits = torch.tensor([[0.0, torch.log(torch.tensor(3.0))], [0.0, 0.0]])
    # mean p = [3/8, 5/8]; deviations from 1/2: -1/8, +1/8 -> sum of squares 1/32.
    got = squared_deviation_loss([logits], alpha=2.0)
    torch.testing.assert_close(got, torch.tensor(2.0 / 32))
    uniform = torch.zeros(5, 4)
    assert squared_deviation_loss([uniform]).item() == 0.0
