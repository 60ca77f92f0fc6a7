"""Merges always end: an impossible max_summary_tokens is refused at start, and a document
whose merge stops shrinking (or runs past the level cap) becomes an error row."""

import pyarrow.parquet as pq
import pytest

import pipeline.strategies as strategies
from pipeline.config import RunConfig
from pipeline.merge import MergeStalled
from pipeline.service import ConfigError, describe, run_documents
from pipeline.stores import Document, content_hash
from pipeline.strategies import MapReduce, MergeBudget
from tests.fakes import EchoPool
from workers.host import WorkResult

TEXT = "The whale surfaced near the ship, and the crew watched in silence. " * 40


def config(model_dir, **kw):
    base = dict(model=str(model_dir), dtype="float32", use_ray=False, chunk_tokens=128,
                overlap=16, max_summary_tokens=8, max_num_batched_tokens=4096)
    base.update(kw)
    return RunConfig(**base)


def doc(doc_id="d", text=TEXT):
    return Document(doc_id, f"mem:{doc_id}", text, content_hash(text))


def test_max_summary_tokens_too_large_for_a_merge_is_refused(tiny_small_ctx_dir, tmp_path):
    pool = EchoPool()
    with pytest.raises(ConfigError) as info:
        run_documents(config(tiny_small_ctx_dir, max_summary_tokens=600), [doc()],
                      tmp_path / "o.parquet", pool=pool)
    msg = str(info.value)
    assert msg.startswith("max_summary_tokens=600 is too large for the model's context of 1024")
    largest = int(msg.split("at most ")[1].split()[0])
    assert 100 < largest < 600
    assert pool.num_requests == 0 and not (tmp_path / "o.parquet").exists()
    # the value it names works (pieces of that size pair, nothing is cut), one more does not
    verbose = VerbosePool("x" * largest)  # byte tokens: answers of exactly that size
    stats, _ = run_documents(config(tiny_small_ctx_dir, max_summary_tokens=largest), [doc()],
                             tmp_path / "o.parquet", pool=verbose)
    assert stats.num_ok == 1 and stats.num_truncated_prompts == 0
    assert stats.num_chunks >= 4 and verbose.num_requests <= 2 * stats.num_chunks
    with pytest.raises(ConfigError, match=f"at most {largest} "):
        run_documents(config(tiny_small_ctx_dir, max_summary_tokens=largest + 1), [doc()],
                      tmp_path / "o2.parquet", pool=pool)
    # refine has no merge: nothing to check
    run_documents(config(tiny_small_ctx_dir, max_summary_tokens=600, strategy="refine"), [doc()],
                  tmp_path / "o3.parquet", pool=pool)


class VerbosePool(EchoPool):
    """Answers every request with the same long text (longer than asked), like a model that
    ignores its budget; gives up after `limit` requests so a broken guard fails, not hangs."""

    def __init__(self, answer: str, limit: int = 200) -> None:
        super().__init__()
        self.answer = answer
        self.limit = limit

    def submit(self, requests) -> None:
        for r in requests:
            self.num_requests += 1
            error = "gave up: the merge never ended" if self.num_requests > self.limit else None
            self._done.append(WorkResult(r.request_id, text=self.answer, token_ids=[1],
                                         finish_reason="length", error=error,
                                         num_prompt_tokens=len(r.prompt_token_ids),
                                         num_generated_tokens=1, replica=0))


def test_a_merge_that_stops_shrinking_becomes_an_error_row(tiny_small_ctx_dir, tmp_path):
    pool = VerbosePool("x" * 600)  # 600 byte tokens: two never fit one merge prompt
    docs = [doc("stuck"), doc("short", "A short one. " * 3)]
    stats, _ = run_documents(config(tiny_small_ctx_dir), docs, tmp_path / "o.parquet", pool=pool)
    rows = {r["doc_id"]: r for r in pq.read_table(tmp_path / "o.parquet").to_pylist()}
    assert rows["short"]["status"] == "ok"
    stuck = rows["stuck"]
    assert stuck["status"] == "error"
    assert "stopped shrinking at level 1" in stuck["error"] and "max_summary_tokens" in stuck["error"]
    assert pool.num_requests < 50 and stats.num_failed == 1


def test_merge_levels_are_capped(tiny_small_ctx_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(strategies, "MAX_MERGE_LEVELS", 1)
    info = describe(config(tiny_small_ctx_dir))
    count = lambda text: len(info.tokenizer.encode(text))  # noqa: E731
    merge = MergeBudget(budget_tokens=100, overhead_tokens=10, count_tokens=count)
    chunks = list(range(8))
    s = MapReduce("k", [type("C", (), {"index": i, "text": "t"})() for i in chunks], None, None,
                  8, merge)
    for i in chunks[:-1]:
        assert s.on_output(strategies.Request(f"k/map/{i}", "map", i, "", 8), "y" * 30) == []
    reqs = s.on_output(strategies.Request("k/map/7", "map", 7, "", 8), "y" * 30)
    assert [r.stage for r in reqs] == ["reduce1"] * 4  # 8 pieces, two per prompt
    for r in reqs[:-1]:
        s.on_output(r, "z" * 30)
    with pytest.raises(MergeStalled, match="did not finish in 1 levels"):
        s.on_output(reqs[-1], "z" * 30)


def test_merged_outputs_lose_the_piece_labels_they_copied():
    """A merge answer that imitates its prompt's "Part N:" layout (as SmolLM2's do) is kept
    without those labels, at every level and in the final summary; a "part 2" inside a
    sentence stays."""
    from pipeline.prompts import reduce_prompt, strip_piece_labels

    assert "Part 1: a" in reduce_prompt(["a", "b"], None)  # what the model sees
    merge = MergeBudget(budget_tokens=10_000, overhead_tokens=10, count_tokens=len)
    s = MapReduce("k", [type("C", (), {"index": i, "text": "t"})() for i in range(2)], None,
                  None, 8, merge)
    s.on_output(strategies.Request("k/map/0", "map", 0, "", 8), "first")
    (req,) = s.on_output(strategies.Request("k/map/1", "map", 1, "", 8), "second")
    assert req.stage == "reduce1"
    s.on_output(req, "\nPart 1: The study of whales.\n\n  Part 2:\nIt ends in part 2: the sea.")
    assert s.summary == "The study of whales.\n\nIt ends in part 2: the sea."
    assert strip_piece_labels("No labels here.") == "No labels here."
