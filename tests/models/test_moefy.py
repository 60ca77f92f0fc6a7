"""docpipe eval (perplexity against transformers) and docpipe moefy (a tiny llama split into
experts: the hard gate at K = E is the dense model; the standard gate loads in transformers
with docpipe's logits), on tiny random checkpoints and a tiny calibration store."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import pipeline.model_cli  # noqa: F401  (registers eval / moefy / calibrate)
from models.loading import load_model
from models.moefy import balanced_kmeans
from pipeline.cli import main
from tests.models.conftest import PROSE
from tests.tiny_checkpoint import make_tiny_checkpoint


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("dense"), "llama", seed=3)


def _run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def _moefy(dense, store, out, *extra, samples=40, sample_tokens=32):
    result = _run("moefy", dense, "-o", out, "--calibration", store, "--samples", samples,
                  "--sample-tokens", sample_tokens, *extra)
    assert result.exit_code == 0, result.output
    return out


def test_eval_matches_transformers(dense, store):
    from transformers import AutoModelForCausalLM

    result = _run("eval", dense, "--data", store, "--window", 100, "--max-tokens", 950,
                  "--dtype", "float32")
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    ppl, n = float(last.split()[1]), int(last.split()[3])
    assert last == f"perplexity: {ppl:.4f} over {n} tokens"
    loaded = load_model(dense, dtype="float32")
    ids = loaded.tokenizer.encode("\n\n".join((store / f"doc{i}.txt").read_text()
                                              for i in range(len(PROSE))))[:950]
    hf = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for lo in range(0, len(ids), 100):
            part = torch.tensor([ids[lo : lo + 100]])
            if part.shape[1] < 2:
                continue
            nll += float(hf(part, labels=part).loss) * (part.shape[1] - 1)
            count += part.shape[1] - 1
    assert n == count == 950 - 10
    assert math.isclose(ppl, math.exp(nll / count), rel_tol=1e-4)


def test_hard_gate_at_k_equal_e_is_the_dense_model(dense, store, tmp_path):
    out = _moefy(dense, store, tmp_path / "moe", "--experts", 4, "--top-k", 4,
                 "--shared-neurons", 16, "--gate", "hard")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "docpipe_moe" and config["moe_intermediate_size"] == 20
    calib = json.loads((out / "calibration.json").read_text())
    assert calib["samples"] == 40 and calib["tokens"] == 40 * 32
    assert len(calib["layers"]) == 2 and "k-means" in calib["method"]
    assert all(0.0 <= layer["fit_residual"] <= 1.0 for layer in calib["layers"])
    ids = torch.randint(0, 250, (2, 40), generator=torch.Generator().manual_seed(0))
    want = load_model(dense, dtype="float32").model.logits_dense(ids)
    moe = load_model(out, dtype="float32")
    assert moe.config.is_moe and moe.config.hard_gate
    torch.testing.assert_close(moe.model.logits_dense(ids), want, rtol=1e-5, atol=1e-5)


def test_hard_gate_below_e_differs_and_routes(dense, store, tmp_path):
    out = _moefy(dense, store, tmp_path / "moe", "--experts", 4, "--top-k", 1)
    moe = load_model(out, dtype="float32").model
    ids = torch.randint(0, 250, (1, 64), generator=torch.Generator().manual_seed(1))
    want = load_model(dense, dtype="float32").model.logits_dense(ids)
    got = moe.logits_dense(ids)
    assert not torch.allclose(got, want, atol=1e-3)
    counts = moe.expert_counts()
    assert int(counts.sum()) == 64 * 2 and int((counts > 0).sum()) >= 2


def test_standard_gate_loads_in_transformers_with_equal_logits(dense, store, tmp_path):
    from transformers import AutoModelForCausalLM

    out = _moefy(dense, store, tmp_path / "moe", "--experts", 4, "--top-k", 2,
                 "--shared-neurons", 16, "--gate", "standard")
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_moe"
    ids = torch.randint(0, 250, (2, 48), generator=torch.Generator().manual_seed(2))
    ours = load_model(out, dtype="float32").model.logits_dense(ids)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(ids).logits
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4)


def test_moefy_is_deterministic_for_a_seed(dense, store, tmp_path):
    cache = tmp_path / "stats.pt"
    a = _moefy(dense, store, tmp_path / "a", "--experts", 4, "--top-k", 2, "--seed", 5)
    b = _moefy(dense, store, tmp_path / "b", "--experts", 4, "--top-k", 2, "--seed", 5,
               "--stats-cache", cache)
    c = _moefy(dense, store, tmp_path / "c", "--experts", 4, "--top-k", 2, "--seed", 5,
               "--stats-cache", cache)  # the sums read back from the cache
    assert cache.is_file()
    weights = {(p / "model.safetensors").read_bytes() for p in (a, b, c)}
    assert len(weights) == 1


def test_balanced_kmeans_sizes_equal_and_groups_alike_rows():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 16, generator=gen)
    rows = torch.cat([base[c] + 0.05 * torch.randn(6, 16, generator=gen) for c in range(4)])
    ids, _ = balanced_kmeans(rows, 4, seed=0)
    assert torch.bincount(ids, minlength=4).tolist() == [6, 6, 6, 6]
    for c in range(4):  # each planted group lands in one cluster
        assert len(set(ids[6 * c : 6 * c + 6].tolist())) == 1


def test_moefy_errors(dense, store, tmp_path):
    r = _run("moefy", dense, "-o", tmp_path / "x", "--experts", 4, "--top-k", 5,
             "--calibration", store)
    assert r.exit_code == 1 and "Error: --top-k 5: must be at most --experts 4" in r.output
    r = _run("moefy", dense, "-o", tmp_path / "x", "--experts", 5, "--top-k", 2,
             "--calibration", store)
    assert r.exit_code == 1
    assert "Error: --shared-neurons 0 / --experts 5: the 96 - 0 routed neurons" in r.output
    r = _run("eval", dense, "--data", tmp_path / "missing")
    assert r.exit_code == 1 and "Error: input" in r.output and "does not exist" in r.output



ROOT = Path(__file__).resolve().parents[2]


def _code_and_prose() -> tuple[list[str], list[str]]:
    """Two code texts (this project's own sources) and two prose texts (the examples'
    speeches), about 3,000 characters each."""
    code = [(ROOT / f).read_text()[:3000] for f in ("models/moe.py", "pipeline/chunking.py")]
    sotu = sorted((ROOT / "examples/sotu").glob("*.txt"))
    return code, [sotu[0].read_text()[:3000], sotu[-1].read_text()[:3000]]


def _expert_distribution(loaded, texts: list[str]) -> torch.Tensor:
    model = loaded.model
    for layer in model.layers:
        if layer.is_moe:
            layer.mlp.expert_counts.zero_()
    with torch.inference_mode():
        for text in texts:
            model.logits_dense(torch.tensor([loaded.tokenizer.encode(text)]))
    # per layer: expert e of one layer has nothing to do with expert e of another
    counts = torch.stack([layer.mlp.expert_counts for layer in model.layers if layer.is_moe])
    counts = counts.double()
    return counts / counts.sum(dim=1, keepdim=True)  # [L, E]


def _js(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon divergence of two [L, E] per-layer distributions, averaged over L."""
    m = (p + q) / 2

    def kl(a, b):
        return (a * (a.clamp_min(1e-12) / b.clamp_min(1e-12)).log()).sum(dim=1)

    return float(((kl(p, m) + kl(q, m)) / 2).mean())


@pytest.mark.slow
def test_code_and_prose_land_on_different_experts(tmp_path):
    """The real SmolLM2, moefied on a little code and prose: the two kinds of text use
    measurably different experts, per layer: nearer their own kind than the other."""
    from models.registry import SMOLLM2_NAME

    code, prose = _code_and_prose()
    store = tmp_path / "calibration"
    store.mkdir()
    for i, text in enumerate(code + prose):
        (store / f"doc{i}.txt").write_text(text)
    out = _moefy(SMOLLM2_NAME, store, tmp_path / "moe", "--experts", 8, "--top-k", 2,
                 "--shared-neurons", 0, samples=32, sample_tokens=64)
    loaded = load_model(out, dtype="float32")
    dists = {f"{kind}{i}": _expert_distribution(loaded, [text])
             for kind, texts in (("code", code), ("prose", prose)) for i, text in enumerate(texts)}
    # each text's experts are nearer the other text of its kind than either text of the
    # other kind (per-layer Jensen-Shannon divergence)
    for name, dist in dists.items():
        same = [_js(dist, d) for n, d in dists.items() if n != name and n[:4] == name[:4]]
        other = [_js(dist, d) for n, d in dists.items() if n[:4] != name[:4]]
        assert max(same) < min(other), (name, same, other)
