"""`docpipe eval`, `docpipe moefy`, `docpipe calibrate`: model tools over a document store.

The commands register on `pipeline.cli.main` when this module is imported (jobs/cli.py does).
Store reading lives here (pipeline owns stores); the maths is in models.evaluate,
models.moefy and models.calibrate, which take token ids. User errors print `Error: ...`
and exit 1 before any work.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import click

from pipeline.cli import CONTEXT, main
from pipeline.config import DTYPE_CHOICES

logger = logging.getLogger(__name__)


def store_texts(path: str, max_docs: int | None = None) -> list[str]:
    """The texts of a store's readable documents, in store order (failed ones skipped)."""
    from pipeline.stores import StoreError, open_store

    try:
        docs = [d for d in open_store(path, limit=max_docs) if d.is_ok and d.text]
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    if not docs:
        raise click.ClickException(f"--data {path}: the store has no readable text")
    return [d.text for d in docs]


def store_token_ids(tokenizer, path: str, option: str = "--data") -> list[int]:
    """The store's documents tokenized and concatenated (a blank line between documents)."""
    if tokenizer is None:
        raise click.ClickException(f"the model has no tokenizer; {option} needs one to read text "
                                   "(put tokenizer.json in the checkpoint directory)")
    return tokenizer.encode("\n\n".join(store_texts(path)))


def _load(model: str, dtype: str, quantization: str = "auto"):
    from models import ModelLoadError, load_model

    try:
        return load_model(model, dtype=dtype, quantization=quantization)
    except (ModelLoadError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None


def _positive(value: int | None, option: str, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise click.ClickException(f"{option} {value}: must be at least {minimum}")


@main.command("eval", context_settings=CONTEXT)
@click.argument("model")
@click.option("--data", "data", required=True, help="Store whose text is scored.")
@click.option("--max-tokens", type=int, default=None, help="Score only the first N tokens.")
@click.option("--window", type=int, default=1024, show_default=True,
              help="Tokens per non-overlapping window (each scored without the one before).")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="auto", show_default=True,
              help="auto: bf16 where the device computes it natively, else float32.")
@click.option("--quantization", type=click.Choice(["auto", "gguf", "none"]), default="auto",
              show_default=True, help="GGUF weights: kept packed (gguf) or dequantized (none).")
def eval_command(model, data, max_tokens, window, dtype, quantization):
    """Perplexity of MODEL (embedded name, .gguf, HF directory) on the text of a store.

    The last line is exactly `perplexity: P over N tokens`."""
    from models.evaluate import perplexity

    _positive(max_tokens, "--max-tokens", 2)
    _positive(window, "--window", 2)
    loaded = _load(model, dtype, quantization)
    ids = store_token_ids(loaded.tokenizer, data)
    start = time.perf_counter()
    result = perplexity(loaded.model, ids, window=window, max_tokens=max_tokens)
    elapsed = time.perf_counter() - start
    if not result.num_tokens:
        raise click.ClickException(f"--data {data}: fewer than 2 tokens to score")
    click.echo(f"model: {loaded.model_id} ({loaded.config.model_type}, {dtype}); "
               f"{result.num_windows} windows of up to {window} tokens; {elapsed:.1f} s "
               f"({result.num_tokens / max(elapsed, 1e-9):.0f} tok/s)")
    click.echo(f"perplexity: {result.perplexity:.4f} over {result.num_tokens} tokens")


@main.command("moefy", context_settings=CONTEXT)
@click.argument("model")
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path),
              help="Directory for the checkpoint (config.json, model.safetensors, tokenizer, "
                   "calibration.json).")
@click.option("--experts", type=int, required=True, help="Routed experts per layer (E).")
@click.option("--top-k", type=int, required=True, help="Experts chosen per token (K).")
@click.option("--shared-neurons", type=int, default=0, show_default=True,
              help="Neurons of the always-on shared expert (those of most activation mass).")
@click.option("--gate", type=click.Choice(["hard", "standard"]), default="hard",
              show_default=True, help="hard: chosen experts weigh 1 (docpipe_moe, docpipe "
              "only; at K = E the dense model); standard: renormalised softmax (qwen2_moe).")
@click.option("--calibration", required=True, help="Store whose text calibrates the split.")
@click.option("--samples", type=int, default=1000, show_default=True,
              help="Calibration windows (of --sample-tokens tokens).")
@click.option("--sample-tokens", type=int, default=128, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--stats-cache", type=click.Path(path_type=Path), default=None,
              help="File for the calibration sums, reused by later runs on the same windows "
                   "(they do not depend on --experts, --top-k, --shared-neurons, --gate).")
def moefy_command(model, output, experts, top_k, shared_neurons, gate, calibration, samples,
                  sample_tokens, seed, stats_cache):
    """Turn MODEL's dense SwiGLU FFNs into a mixture of experts, calibrated on a store."""
    from models.moefy import moefy

    _positive(experts, "--experts", 2)
    _positive(top_k, "--top-k")
    _positive(samples, "--samples")
    _positive(sample_tokens, "--sample-tokens", 2)
    if top_k > experts:
        raise click.ClickException(f"--top-k {top_k}: must be at most --experts {experts}")
    if shared_neurons < 0:
        raise click.ClickException(f"--shared-neurons {shared_neurons}: must be at least 0")
    if output.exists() and any(output.iterdir()):
        raise click.ClickException(f"-o {output}: the directory is not empty; pick a new one")
    loaded = _load(model, "float32", "none")  # moefy slices the weights: dequantized
    if loaded.tokenizer is None:
        raise click.ClickException(f"{model}: the model has no tokenizer to read the calibration text")
    inter = loaded.config.intermediate_size
    if loaded.config.is_moe:
        raise click.ClickException(f"{model}: already a mixture of experts")
    if shared_neurons >= inter or (inter - shared_neurons) % experts:
        raise click.ClickException(
            f"--shared-neurons {shared_neurons} / --experts {experts}: the {inter} - "
            f"{shared_neurons} routed neurons must split into {experts} equal experts")
    token_ids = [loaded.tokenizer.encode(t) for t in store_texts(calibration)]
    start = time.perf_counter()
    try:
        report = moefy(loaded.model, loaded.tokenizer, token_ids, output, num_experts=experts,
                       top_k=top_k, shared_neurons=shared_neurons, gate=gate,
                       num_samples=samples, sample_tokens=sample_tokens, seed=seed,
                       stats_cache=stats_cache)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    residuals = [layer["fit_residual"] for layer in report["layers"]]
    click.echo(f"moefy: {len(residuals)} layers, {experts} experts (top-{top_k}, gate {gate}), "
               f"shared {shared_neurons} neurons; calibration {report['samples']} windows, "
               f"{report['tokens']} tokens; router fit residual mean "
               f"{sum(residuals) / len(residuals):.3f}, max {max(residuals):.3f}")
    click.echo(f"wrote {output} in {time.perf_counter() - start:.1f} s")


def _load_table(loads) -> list[str]:
    E = len(loads[0].counts)
    head = (f"{'layer':>5} {'max/mean':>8} {'cv':>6} {'entropy':>7} {'switch':>7} "
            f"{'var':>9}  load % per expert 0..{E - 1}")
    lines = [head]
    for l in loads:
        fractions = " ".join(f"{100 * f:4.1f}" for f in l.load_fraction)
        lines.append(f"{l.layer:>5} {l.max_over_mean:>8.3f} {l.cv:>6.3f} {l.entropy:>7.3f} "
                     f"{l.switch_loss:>7.3f} {l.variance_loss:>9.2e}  {fractions}")
    return lines


@main.command("calibrate", context_settings=CONTEXT)
@click.argument("model")
@click.option("--data", "data", required=True, help="Store whose text the routers see.")
@click.option("--samples", type=int, default=1000, show_default=True,
              help="Calibration windows (of --sample-tokens tokens).")
@click.option("--sample-tokens", type=int, default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--balance", is_flag=True,
              help="Fit per-expert selection biases (DeepSeek-V3's aux-loss-free rule) and "
                   "write them beside the checkpoint (expert_bias.safetensors, applied at load).")
@click.option("--gamma", type=float, default=1e-2, show_default=True,
              help="Bias step of --balance (decays to gamma / 100 over the passes).")
@click.option("--alpha", type=float, default=1.0, show_default=True,
              help="Coefficient of the two aux losses in the report.")
@click.option("-o", "--output", "output", type=click.Path(path_type=Path), default=None,
              help="Report directory: calibrate.json and heatmaps (layers x experts) as PNG.")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="float32", show_default=True)
def calibrate_command(model, data, samples, sample_tokens, seed, balance, gamma, alpha, output,
                      dtype):
    """Router load of a MoE MODEL on a store, per layer and expert; --balance evens it out."""
    from models.calibrate import heatmap, router_loads, summary
    from models.moe import EXPERT_BIAS_FILE, save_expert_bias
    from models.moefy import calibration_windows

    _positive(samples, "--samples")
    _positive(sample_tokens, "--sample-tokens", 2)
    if gamma <= 0:
        raise click.ClickException(f"--gamma {gamma}: must be positive")
    loaded = _load(model, dtype)
    if not loaded.config.is_moe:
        raise click.ClickException(f"{model}: not a mixture-of-experts model (no router to "
                                   "calibrate); moefy it first (docpipe moefy)")
    target = Path(model)
    if balance and not (target.is_dir() and (target / "config.json").is_file()):
        raise click.ClickException(f"--balance: {model} is not a checkpoint directory; the "
                                   f"biases are written beside it ({EXPERT_BIAS_FILE})")
    token_ids = [loaded.tokenizer.encode(t) for t in store_texts(data)] if loaded.tokenizer else None
    if token_ids is None:
        raise click.ClickException(f"{model}: the model has no tokenizer to read --data")
    try:
        windows = calibration_windows(token_ids, samples, sample_tokens, seed)
    except ValueError as exc:
        raise click.ClickException(f"--data {data}: {exc}") from None
    start = time.perf_counter()
    before, _ = router_loads(loaded.model, windows, alpha=alpha)
    click.echo(f"router load on {len(windows)} windows ({sum(map(len, windows))} tokens), "
               f"{loaded.model_id}:")
    for line in _load_table(before):
        click.echo(line)
    report = {"model": loaded.model_id, "samples": len(windows),
              "tokens": sum(map(len, windows)), "before": [l.to_dict() for l in before],
              "before_summary": summary(before)}
    after = None
    if balance:
        after, biases = router_loads(loaded.model, windows, balance=True, gamma=gamma,
                                     alpha=alpha)
        save_expert_bias(target, biases)
        click.echo(f"balanced (gamma {gamma}); wrote {target / EXPERT_BIAS_FILE}:")
        for line in _load_table(after):
            click.echo(line)
        report["after"] = [l.to_dict() for l in after]
        report["after_summary"] = summary(after)
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        (output / "calibrate.json").write_text(json.dumps(report, indent=2) + "\n")
        heatmap(before, output / "load_before.png", "load before balancing")
        if after is not None:
            heatmap(after, output / "load_after.png", "load after --balance")
        click.echo(f"report: {output}")
    worst = max(l.max_over_mean for l in before)
    line = f"max/mean load: {worst:.3f} (worst layer)"
    if after is not None:
        line = (f"max/mean load: before {worst:.3f}, after "
                f"{max(l.max_over_mean for l in after):.3f} (worst layer)")
    click.echo(f"{line}; {time.perf_counter() - start:.1f} s")
