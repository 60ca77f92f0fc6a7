"""Over-long prompts are cut by token ids inside the user message; the chat template is kept
whole and the row records how many prompts were cut and by how many tokens."""

import pyarrow.parquet as pq

from pipeline.config import RunConfig
from pipeline.prompts import as_chat, map_prompt
from pipeline.runner import PromptFitter
from pipeline.service import describe, run_documents
from pipeline.stores import Document, content_hash
from pipeline.strategies import Request
from tests.fakes import EchoPool

# Three-byte characters: with the byte-level tokenizer a cut can land inside one.
TEXT = "鯨が船の近くに浮上し、乗組員は黙って見守った。" * 120 + "The end."


class PromptPool(EchoPool):
    def __init__(self) -> None:
        super().__init__()
        self.prompts: dict[str, tuple[list[int], int]] = {}

    def submit(self, requests) -> None:
        for r in requests:
            self.prompts[r.request_id] = (list(r.prompt_token_ids), r.sampling["max_tokens"])
        super().submit(requests)


def test_cut_inside_the_message_never_the_template(tiny_small_ctx_dir, tmp_path):
    config = RunConfig(model=str(tiny_small_ctx_dir), dtype="float32", use_ray=False,
                       chunk_tokens=600, overlap=0, max_summary_tokens=16,
                       max_num_batched_tokens=4096)
    info = describe(config)
    fitter = PromptFitter(info.tokenizer, info.max_model_len)
    head, tail = fitter.template_ids()
    assert len(head) > 3 and len(tail) > 3  # role markers and the generation prompt

    pool = PromptPool()
    doc = Document("whale", "mem:whale", TEXT, content_hash(TEXT))
    stats, _ = run_documents(config, [doc], tmp_path / "o.parquet", pool=pool)
    (row,) = pq.read_table(tmp_path / "o.parquet").to_pylist()
    assert row["status"] == "ok", row["error"]

    expected_cut, num_cut = 0, 0
    for rid, (ids, max_tokens) in pool.prompts.items():
        limit = info.max_model_len - max_tokens - 1
        assert len(ids) <= limit, rid
        assert ids[:len(head)] == head and ids[len(ids) - len(tail):] == tail, rid
        stage, index = rid.split("/")[1:]
        if stage != "map":
            continue
        chunk = row["chunks"][int(index)]
        prompt = map_prompt(TEXT[chunk["char_start"]:chunk["char_end"]], None)
        full = info.tokenizer.apply_chat_template(as_chat(prompt))
        if len(full) > limit:
            num_cut += 1
            expected_cut += len(full) - limit
            assert len(ids) == limit  # cut exactly to fit: no decode/re-encode drift
    assert num_cut >= 2
    assert (row["num_truncated_prompts"], row["num_truncated_tokens"]) == (num_cut, expected_cut)
    assert stats.num_truncated_prompts == num_cut


def test_a_prompt_that_fits_is_not_touched(tiny_small_ctx_dir):
    info = describe(RunConfig(model=str(tiny_small_ctx_dir), dtype="float32"))
    fitter = PromptFitter(info.tokenizer, info.max_model_len)
    req = Request("k/map/0", "map", 0, "Summarize: a short text.", 16)
    assert fitter.fit(req) == (info.tokenizer.apply_chat_template(as_chat(req.prompt)), 0)
    assert fitter.num_truncated == 0
