"""moefy on SmolLM2-135M-Instruct: perplexity on held-out text, greedy agreement with the
dense model, FFN FLOPs per token and prefill tok/s for several (E, K, S), in one run.

    .venv/bin/python benchmarks/moefy.py [--samples 1000] [--sample-tokens 64]
        [--settings 16,4,256 16,8,0 8,2,256] [--standard-settings 16,4,256]
        [--eval-tokens 8192] [--greedy-tokens 256] [--prompts 4] [--work benchmarks/out/moefy]

Calibration text: examples/sotu/ 1790 and 1934, and the first 80% of
benchmarks/data/moby-dick-100k.txt (cut at a paragraph); held out (never calibrated on):
sotu 2002 and the last 20% of moby-dick. Perplexity is `docpipe eval`'s (models.evaluate,
windows of 1024 tokens over the first --eval-tokens held-out tokens, fp32). Greedy
agreement: the share of positions, over --greedy-tokens greedy tokens from each of
--prompts held-out prompts of 128 tokens (engine, batch-invariant, fp32), whose token equals
the dense model's at the same position. Prefill: one forward over 2048 held-out tokens
(16 sequences of 128), warm-up excluded, best of --rounds x --repeats, the models
interleaved (the machine is shared). Quality results are cached in WORK/results.json.

`--oracle` adds two kinds of bound rows: each hard-gate model with its router replaced by
the best choice of its own experts (the K with the most activation mass per token), and the
dense model keeping per token only each FFN's top neurons by mass, at each setting's active
share (the best any MoE with that share could do).

Measured 2026-12-01, session 6 (AMD EPYC Zen 4, 2 threads), the defaults plus `--oracle`
(the full table is in the README, "MoE from a dense model"): dense 35.95; hard E=16 K=4
S=256 11.96x (oracle router 7.53x), prefill 1.12x; hard E=16 K=8 S=0 9.01x (4.87x), 0.89x;
hard E=8 K=2 S=256 15.88x (13.21x), 1.50x; standard E=16 K=4 S=256 12.36x, 1.10x; top 37.5%
neurons 1.09x, top 50% 1.03x. Neither goal is met: the partition, not the router, is what
loses the quality.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "smollm2-135m-instruct"


def make_split(work: Path) -> tuple[Path, Path]:
    """(calibration store, held-out store): two directories of .txt files."""
    calib, held = work / "calib", work / "heldout"
    calib.mkdir(parents=True, exist_ok=True)
    held.mkdir(parents=True, exist_ok=True)
    sotu = sorted((ROOT / "examples/sotu").glob("*.txt"))
    for p in sotu[:-1]:
        (calib / p.name).write_text(p.read_text())
    (held / sotu[-1].name).write_text(sotu[-1].read_text())
    moby = (ROOT / "benchmarks/data/moby-dick-100k.txt").read_text()
    cut = moby.find("\n\n", int(len(moby) * 0.8))
    (calib / "moby-dick-head.txt").write_text(moby[:cut])
    (held / "moby-dick-tail.txt").write_text(moby[cut + 2 :])
    return calib, held


def cli(*args: str) -> str:
    code = ("import sys, pipeline.model_cli; from pipeline.cli import main; "
            "main(sys.argv[1:], standalone_mode=True)")
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, check=True,
                         capture_output=True, text=True)
    return out.stdout


def cpu_name() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name"):
            return line.split(":", 1)[1].strip()
    return "?"


def ffn_flops_per_token(cfg) -> int:
    """Multiply-adds x 2 of the FFNs per token (router included), summed over layers."""
    H = cfg.hidden_size
    if not cfg.is_moe:
        return 2 * 3 * H * cfg.intermediate_size * cfg.num_hidden_layers
    active = cfg.num_experts_per_tok * cfg.moe_intermediate_size + cfg.shared_expert_intermediate_size
    router = H * cfg.num_local_experts
    return 2 * (3 * H * active + router) * cfg.num_hidden_layers


def prefill_tok_s(model, ids, repeats: int = 3) -> float:
    import torch

    from models.attention import AttentionMetadata

    seqs = [ids[i : i + 128] for i in range(0, 2048, 128)]
    flat = torch.tensor([t for s in seqs for t in s])
    positions = torch.arange(128).repeat(len(seqs))
    meta = AttentionMetadata.for_dense([128] * len(seqs))
    best = float("inf")
    with torch.inference_mode():
        model(flat, positions, meta)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model(flat, positions, meta)
            best = min(best, time.perf_counter() - start)
    return flat.numel() / best


def oracle_gate(block):
    """Stands in for a hard-gate MoE block's router: each token's "logits" are the log of
    every expert's true activation mass on it (sum over its neurons of |silu(g) * u| times
    the down column's norm, moefy's own measure), so the chosen K are the K that carry the
    most mass. Costs the dense FFN: a bound on what any router can do with this partition."""
    import torch

    col_norms = block.w2.detach().float().norm(dim=1)  # [E, I]
    w13 = block.w13.detach().float()

    class OracleGate(torch.nn.Module):
        def forward(self, x, fixed_k=False):
            gu = torch.einsum("nh,eoh->eno", x.float(), w13)  # [E, N, 2I]
            g, u = gu.chunk(2, dim=-1)
            mass = (torch.nn.functional.silu(g) * u).abs().mul(col_norms[:, None, :]).sum(-1)
            return mass.T.clamp_min(1e-30).log()  # [N, E]

    return OracleGate()


def with_top_neurons(loaded, fraction: float):
    """The dense model keeping, per token and layer, only the `fraction` of FFN neurons with
    the most activation mass: the bound of any MoE (any partition, any router) that runs
    that fraction of the neurons."""
    import torch

    from models.layers import GatedMLP

    def forward_of(m):
        norms = m.down_proj.weight.detach().float().norm(dim=0)

        def forward(x, fixed_k=False):
            h = m.act_mul(m.gate_up_proj(x, fixed_k))
            k = int(round(fraction * h.shape[-1]))
            if k < h.shape[-1]:
                idx = (h.abs() * norms).topk(k, dim=-1).indices
                h = torch.zeros_like(h).scatter_(-1, idx, h.gather(-1, idx))
            return m.down_proj(h, fixed_k)
        return forward

    for m in loaded.model.modules():
        if isinstance(m, GatedMLP):
            m.forward = forward_of(m)
    return loaded


def active_fraction(E: int, K: int, S: int, intermediate: int) -> float:
    return (S + K / E * (intermediate - S)) / intermediate


def with_oracle_router(loaded):
    from models.moe import SparseMoeBlock

    blocks = [m for m in loaded.model.modules() if isinstance(m, SparseMoeBlock)]
    assert blocks and all(b.hard for b in blocks), "the oracle router is for hard-gate models"
    for b in blocks:
        b.gate = oracle_gate(b)
    return loaded


def greedy(path, prompts: list[list[int]], num_tokens: int) -> list[list[int]]:
    from models import LLM, SamplingParams
    from models.loading import load_model

    loaded = path if not isinstance(path, str) else load_model(path, dtype="float32",
                                                               quantization="none")
    llm = LLM(loaded, batch_invariant=True)
    params = SamplingParams(max_tokens=num_tokens, temperature=0.0, ignore_eos=True)
    return [list(o.token_ids) for o in llm.generate(prompts, params)]


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    return same / sum(len(r) for r in a)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--sample-tokens", type=int, default=64)
    ap.add_argument("--settings", nargs="+", default=["16,4,256", "16,8,0", "8,2,256"],
                    help="E,K,S of the hard-gate models")
    ap.add_argument("--standard-settings", nargs="*", default=["16,4,256"],
                    help="E,K,S of the standard-gate models")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks/out/moefy")
    ap.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens scored")
    ap.add_argument("--greedy-tokens", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=4, help="held-out greedy prompts")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved prefill rounds")
    ap.add_argument("--repeats", type=int, default=3, help="timed prefills per round")
    ap.add_argument("--oracle", action="store_true",
                    help="also score each hard-gate model with the oracle router (the bound "
                         "of its partition: experts chosen by their true activation mass)")
    ap.add_argument("--only", default=None,
                    help="make and measure one label's quality (e.g. dense), then stop")
    args = ap.parse_args()

    import json

    import torch

    from models.loading import load_model
    from pipeline.model_cli import store_texts

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    calib, held = make_split(args.work)
    print(f"cpu: {cpu_name()}; threads {torch.get_num_threads()}", flush=True)
    dense = load_model(MODEL, dtype="float32", quantization="none")
    held_ids = dense.tokenizer.encode("\n\n".join(store_texts(str(held))))
    prompts = [held_ids[i * 1000 : i * 1000 + 128] for i in range(args.prompts)]
    del dense
    candidates = [("dense", MODEL)]
    cache = args.work / f"stats-{args.samples}x{args.sample_tokens}.pt"
    for gate, settings in (("hard", args.settings), ("standard", args.standard_settings)):
        for s in settings:
            E, K, S = (int(v) for v in s.split(","))
            out = args.work / f"smol-moe-{gate}-e{E}k{K}s{S}"
            label = f"{gate} E={E} K={K} S={S}"
            candidates.append((label, str(out)))
            if args.only not in (None, label) or (out / "config.json").is_file():
                continue
            start = time.perf_counter()
            cli("moefy", MODEL, "-o", str(out), "--experts", str(E), "--top-k", str(K),
                "--shared-neurons", str(S), "--gate", gate, "--calibration", str(calib),
                "--samples", str(args.samples), "--sample-tokens", str(args.sample_tokens),
                "--stats-cache", str(cache))
            print(f"moefy {label}: {time.perf_counter() - start:.0f} s", flush=True)
    results_path = args.work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for label, path in candidates:  # quality: cached per label (deterministic)
        if label in results or args.only not in (None, label):
            continue
        last = cli("eval", path, "--data", str(held), "--window", "1024", "--max-tokens",
                   str(args.eval_tokens), "--dtype", "float32", "--quantization", "none").strip().splitlines()[-1]
        tokens = greedy(path, prompts, args.greedy_tokens)
        results[label] = {"eval": last, "perplexity": float(last.split()[1]), "greedy": tokens}
        results_path.write_text(json.dumps(results))
        print(f"{label}: {last}", flush=True)
    if args.oracle:
        from models.evaluate import perplexity

        for label, path in list(candidates):
            if not label.startswith("hard") or f"{label} oracle" in results:
                continue
            loaded = with_oracle_router(load_model(path, dtype="float32", quantization="none"))
            ppl = perplexity(loaded.model, held_ids, 1024, args.eval_tokens)
            results[f"{label} oracle"] = {
                "eval": f"perplexity: {ppl.perplexity:.4f} over {ppl.num_tokens} tokens",
                "perplexity": ppl.perplexity, "greedy": greedy(loaded, prompts, args.greedy_tokens)}
            results_path.write_text(json.dumps(results))
            print(f"{label} oracle: perplexity {ppl.perplexity:.2f}", flush=True)
        intermediate = load_model(MODEL, dtype="float32", quantization="none").config.intermediate_size
        fractions = sorted({active_fraction(*(int(v) for v in s.split(",")), intermediate)
                            for s in args.settings})
        for f in fractions:
            key = f"top {f:.1%} neurons"
            if key in results:
                continue
            loaded = with_top_neurons(load_model(MODEL, dtype="float32", quantization="none"), f)
            ppl = perplexity(loaded.model, held_ids, 1024, args.eval_tokens)
            results[key] = {"perplexity": ppl.perplexity, "fraction": f,
                            "greedy": greedy(loaded, prompts, args.greedy_tokens)}
            results_path.write_text(json.dumps(results))
            print(f"dense, {key} per token: perplexity {ppl.perplexity:.2f}", flush=True)
    if args.only is not None:
        return
    models = {label: load_model(path, dtype="float32", quantization="none")
              for label, path in candidates}
    speed = {label: 0.0 for label, _ in candidates}
    for _ in range(args.rounds):  # interleaved, best of the rounds: the machine is shared
        for label, _ in candidates:
            speed[label] = max(speed[label], prefill_tok_s(models[label].model, held_ids,
                                                           args.repeats))
    d = results["dense"]
    d_flops = ffn_flops_per_token(models["dense"].config)
    print(f"held-out: {d['eval']} (dense); greedy {len(prompts)} prompts x "
          f"{args.greedy_tokens} tokens; prefill 2048 tokens, best of {args.rounds} x "
          f"{args.repeats}")
    print("| model | perplexity (x dense) | greedy agreement | FFN MFLOP/token (x dense) | "
          "prefill tok/s (x dense) |")
    print("| --- | --- | --- | --- | --- |")
    for label, _ in candidates:
        r, flops = results[label], ffn_flops_per_token(models[label].config)
        agree = agreement(r["greedy"], d["greedy"])
        print(f"| {label} | {r['perplexity']:.2f} ({r['perplexity'] / d['perplexity']:.2f}x) | "
              f"{agree:.1%} | {flops / 1e6:.1f} ({flops / d_flops:.2f}x) | "
              f"{speed[label]:.0f} ({speed[label] / speed['dense']:.2f}x) |")
        if f"{label} oracle" in results:  # same partition, the best choice of experts
            o = results[f"{label} oracle"]
            print(f"| {label}, oracle router (bound) | {o['perplexity']:.2f} "
                  f"({o['perplexity'] / d['perplexity']:.2f}x) | "
                  f"{agreement(o['greedy'], d['greedy']):.1%} | (dense FFN cost) | - |")
    for key, r in results.items():  # the bound of any MoE at each active fraction
        if key.startswith("top "):
            print(f"| dense, {key} per token (bound of any MoE) | {r['perplexity']:.2f} "
                  f"({r['perplexity'] / d['perplexity']:.2f}x) | "
                  f"{agreement(r['greedy'], d['greedy']):.1%} | (dense FFN cost) | - |")


if __name__ == "__main__":
    main()
