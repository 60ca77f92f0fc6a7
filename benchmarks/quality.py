"""Summary quality on real papers with human references: ACLSum (train/val splits only).

    python benchmarks/quality.py [--split val] [--limit 40] [--models smollm2-135m-instruct,...]
                                 [--strategies map-reduce,overlap-summary,refine]

Input: each paper's body text (S2ORC parse in the `aclsum` package: `pip install --no-deps
aclsum==0.1.2`; its files are read, the package is never imported), without its abstract.
Reference: the authors' abstract. Scores: ROUGE-1/2/L F1 (`rouge-score`, the standard
implementation, with its Porter stemmer), averaged over papers; beside each figure, in the
same run, the lead-120-words baseline and a single-pass baseline (the model on the paper's
first chunk only, with the map prompt). Faithfulness (pipeline.quality): the share of a
summary's content words and names found in its paper, and how many summaries it flags off
topic. The test split is never read: it is kept for independent checks.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this folder comes first on sys.path, where benchmarks/pipeline.py would
# shadow the `pipeline` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

SPLITS = ("train", "val")  # never "test"
LEAD_WORDS = 120


def aclsum_dir() -> Path:
    spec = importlib.util.find_spec("aclsum")
    if spec is None or spec.origin is None:
        sys.exit("aclsum is not installed: pip install --no-deps aclsum==0.1.2")
    return Path(spec.origin).parent / "dataset"


def load_papers(split: str, limit: int | None) -> list[dict]:
    assert split in SPLITS, "the test split is kept for independent checks"
    root = aclsum_dir()
    papers = []
    for line in (root / f"{split}.jsonl").read_text().splitlines():
        pid = json.loads(line)["id"]
        raw = json.loads((root / "paper_jsons" / f"{pid}.json").read_text())
        body = "\n\n".join(p["text"] for p in raw["pdf_parse"]["body_text"] if p["text"].strip())
        abstract = raw.get("abstract") or " ".join(
            p["text"] for p in raw["pdf_parse"].get("abstract", []))
        if body and abstract:
            papers.append({"id": pid, "title": raw.get("title") or "", "text": body,
                           "abstract": abstract})
        if limit and len(papers) >= limit:
            break
    return papers


def rouge(pairs: list[tuple[str, str]]) -> dict[str, float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, hyp) for hyp, ref in pairs]
    return {k: statistics.fmean(s[k].fmeasure for s in scores) for k in ("rouge1", "rouge2", "rougeL")}


def faith(pairs: list[tuple[str, str]]) -> tuple[float, int]:
    from pipeline.quality import faithfulness

    results = [faithfulness(hyp, src) for hyp, src in pairs]
    return statistics.fmean(r.content_share for r in results), sum(r.off_topic for r in results)


def parse_overrides(items: list[str]) -> dict:
    """`--set key=value` pairs, typed by the run settings' schema (pipeline.settings)."""
    from pipeline.settings import BY_NAME

    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in BY_NAME:
            sys.exit(f"--set {item}: no run setting named {key!r} (see docpipe run --help)")
        kind = BY_NAME[key].type
        out[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return out


def run_model(model: str, strategy: str, papers: list[dict], first_chunk_only: bool,
              overrides: dict | None = None) -> tuple[list[str], float]:
    from pipeline.chunking import chunk_text
    from pipeline.config import RunConfig
    from pipeline.output import read_results
    from pipeline.service import run_documents
    from pipeline.stores import Document, content_hash

    config = RunConfig(model=model, strategy=strategy, use_ray=False, **(overrides or {}))
    docs = []
    for p in papers:
        text = p["text"]
        if first_chunk_only:
            text = text[: chunk_text(text, config.chunk_tokens, 0, config.encoding)[0].char_end]
        docs.append(Document(p["id"], p["id"], text, content_hash(text)))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "o.parquet"
        t0 = time.perf_counter()
        run_documents(config, docs, out)
        wall = time.perf_counter() - t0
        rows = {r["doc_id"]: r for r in read_results(out)}
    return [rows[p["id"]]["summary"] or "" for p in papers], wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", choices=SPLITS, default="val")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--models", default="smollm2-135m-instruct")
    ap.add_argument("--strategies", default="map-reduce,overlap-summary,refine")
    ap.add_argument("--json", type=Path, default=None, help="Also write the table as JSON.")
    ap.add_argument("--save", type=Path, default=None,
                    help="Also write every summary, one JSONL file per model and method, here.")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="Override a run setting for every model run (repeatable), e.g. "
                         "--set max_summary_tokens=256.")
    ap.add_argument("--no-single-pass", action="store_true", help="Skip the single-pass baseline.")
    args = ap.parse_args()
    overrides = parse_overrides(args.set)

    from models.cpu import cpu_info

    papers = load_papers(args.split, args.limit)
    words = [len(p["text"].split()) for p in papers]
    print(f"cpu        : {cpu_info().describe()}")
    print(f"data       : ACLSum {args.split}, {len(papers)} papers, {statistics.fmean(words):,.0f} "
          f"words on average ({min(words):,}-{max(words):,}); reference: the abstract")
    if overrides:
        print(f"settings   : {overrides}")
    table = []

    def row(model, method, summaries, wall):
        words = statistics.fmean(len(s.split()) for s in summaries)
        if args.save:
            args.save.mkdir(parents=True, exist_ok=True)
            with open(args.save / f"{model}.{method}.jsonl", "w") as f:
                for s, p in zip(summaries, papers):
                    f.write(json.dumps({"id": p["id"], "summary": s}) + "\n")
        r = rouge([(s, p["abstract"]) for s, p in zip(summaries, papers)])
        share, off = faith([(s, p["text"]) for s, p in zip(summaries, papers)])
        table.append(dict(model=model, method=method, wall_s=wall, off_topic=off,
                          faithfulness=share, words=words, **r))
        print(f"{model:<28} {method:<18} R1 {r['rouge1']:.3f}  R2 {r['rouge2']:.3f}  "
              f"RL {r['rougeL']:.3f}  faithful {share:.2f}  off-topic {off:>2}/{len(papers)}  "
              f"{words:5.0f} words  {wall:7.1f} s", flush=True)

    row("-", f"lead-{LEAD_WORDS}", [" ".join(p["text"].split()[:LEAD_WORDS]) for p in papers], 0.0)
    for model in args.models.split(","):
        if not args.no_single_pass:
            summaries, wall = run_model(model, "map-reduce", papers, True, overrides)
            row(model, "single-pass", summaries, wall)
        for strategy in filter(None, args.strategies.split(",")):
            summaries, wall = run_model(model, strategy, papers, False, overrides)
            row(model, strategy, summaries, wall)
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
