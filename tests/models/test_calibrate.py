"""docpipe calibrate: router load per layer and expert, aux losses, heatmaps, and
DeepSeek-V3's aux-loss-free balancing (biases beside the checkpoint, applied at load)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import pipeline.model_cli  # noqa: F401  (registers eval / moefy / calibrate)
from models.calibrate import fit_bias, router_loads
from models.loading import load_model
from models.moe import EXPERT_BIAS_FILE, route
from models.moefy import calibration_windows
from pipeline.cli import main
from tests.tiny_checkpoint import make_tiny_checkpoint


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("mixtral"), "mixtral", seed=1)


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_layerwise_loads_equal_the_models_own_counts(mixtral, store):
    loaded = load_model(mixtral, dtype="float32")
    ids = [loaded.tokenizer.encode((store / f"doc{i}.txt").read_text()) for i in range(4)]
    windows = calibration_windows(ids, 12, 32, seed=0)
    loads, _ = router_loads(loaded.model, windows, batch_windows=4)
    model = load_model(mixtral, dtype="float32").model
    for lo in range(0, len(windows), 4):
        model.logits_dense(torch.tensor(windows[lo : lo + 4]))
    want = [layer.mlp.expert_counts.tolist() for layer in model.layers]
    assert [l.counts for l in loads] == want
    assert all(abs(sum(l.load_fraction) - 1) < 1e-9 for l in loads)


def test_calibrate_report_and_heatmap(mixtral, store, tmp_path):
    r = _run("calibrate", mixtral, "--data", store, "--samples", 16, "--sample-tokens", 32,
             "-o", tmp_path / "report")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[1].split()[:6] == ["layer", "max/mean", "cv", "entropy", "switch", "var"]
    assert [line.split()[0] for line in lines[2:4]] == ["0", "1"]
    report = json.loads((tmp_path / "report/calibrate.json").read_text())
    assert report["tokens"] == 16 * 32 and len(report["before"]) == 2
    assert (tmp_path / "report/load_before.png").stat().st_size > 1000
    assert lines[-1].startswith("max/mean load: ")


def test_balance_fits_biases_applied_at_load(store, tmp_path):
    dense = make_tiny_checkpoint(tmp_path / "dense", "llama", seed=3)
    moe = tmp_path / "moe"
    r = _run("moefy", dense, "-o", moe, "--experts", 4, "--top-k", 1, "--calibration", store,
             "--samples", 40, "--sample-tokens", 32)
    assert r.exit_code == 0, r.output
    hash_before = load_model(moe).weights_hash
    r = _run("calibrate", moe, "--data", store, "--samples", 40, "--sample-tokens", 32,
             "--balance", "-o", tmp_path / "report")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "report/calibrate.json").read_text())
    after = report["after_summary"]["max_over_mean"]
    assert after <= 1.25 and after < report["before_summary"]["max_over_mean"]
    assert (moe / EXPERT_BIAS_FILE).is_file() and (tmp_path / "report/load_after.png").is_file()
    reloaded = load_model(moe, dtype="float32")
    assert reloaded.weights_hash != hash_before
    assert all(layer.mlp.has_selection_bias for layer in reloaded.model.layers)
    # the loaded model routes as balanced: its own counts on the calibration windows
    loads, _ = router_loads(reloaded.model, calibration_windows(
        [reloaded.tokenizer.encode((store / f"doc{i}.txt").read_text()) for i in range(4)],
        40, 32, seed=0))
    assert max(l.max_over_mean for l in loads) == pytest.approx(after)


def test_fit_bias_evens_a_skewed_router_weights_unbiased():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4096, 8, generator=gen) + torch.linspace(0, 3, 8)  # skewed to 7

    class Gate:
        top_k, scoring_func, n_group, topk_group, normalize = 2, "softmax", 1, 1, True

    bias = fit_bias(Gate, logits, 256, gamma=1e-2, num_passes=40)
    w, ids = route(logits, 2, selection_bias=bias)
    load = torch.bincount(ids.reshape(-1), minlength=8).double()
    assert float(load.max() / load.mean()) <= 1.1
    probs = torch.softmax(logits, -1).gather(1, ids)
    torch.testing.assert_close(w, probs / probs.sum(-1, keepdim=True))


def test_calibrate_errors(store, tmp_path):
    dense = make_tiny_checkpoint(tmp_path / "dense", "llama", seed=3)
    r = _run("calibrate", dense, "--data", store)
    assert r.exit_code == 1 and "Error: " in r.output and "not a mixture-of-experts" in r.output
